"""The README's table of hyperparameters says what the code does: every name is a trial setting,
each is mapped to the authors' flag it is, and the defaults it states are the code's."""

import re
from pathlib import Path

from sora_tune.config import DEFAULT_PAPER_ETA, DEFAULT_XI, TrialConfig

README = Path(__file__).resolve().parents[1] / "README.md"
# Ours -> the authors' flag (TsinghuaC3I/SoRA run_glue.py), as issue 12 established them.
AUTHORS_FLAGS = {
    "eta": "--sparse_lr",
    "lam": "--sparse_lambda",
    "xi": "--sparse_lambda_2",
    "r_max": "--lora_r",
    "lr": "--learning_rate",
    "max_grad_norm": "--max_grad_norm",
}


def hyperparameter_rows() -> dict[str, list[str]]:
    text = README.read_text()
    table = text[text.index("| ours |", text.index("### Hyperparameters")) :]
    table = table[: table.index("\n\n")]
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        if cells and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells
    return rows


def test_every_row_is_a_setting_mapped_to_the_authors_flag():
    rows = hyperparameter_rows()
    fields = {f for f in TrialConfig.__dataclass_fields__}
    assert set(rows) <= fields
    assert set(AUTHORS_FLAGS) <= set(rows)
    for name, flag in AUTHORS_FLAGS.items():
        assert f"`{flag}`" in rows[name][2], name
    assert "`--sparse_lambda`" in rows["lam"][1], "Table 7's η_t is the authors' λ"


def test_the_stated_defaults_are_the_codes():
    rows = hyperparameter_rows()
    defaults = TrialConfig()
    assert rows["eta"][4] == f"`lr` (official), {DEFAULT_PAPER_ETA:g} (paper)"
    assert defaults.eta is None and defaults.effective_eta == defaults.lr
    assert float(rows["xi"][4].split()[0]) == DEFAULT_XI == defaults.xi_plan().xi
    assert float(rows["lam"][4].split()[0]) == defaults.lam
    # The paper's values, not the authors' run_glue_sora_no_schedule.sh: the table says both.
    assert rows["xi"][4].endswith("(Table 6; their script: 3e-4)")
    assert rows["lam"][4].endswith("(Table 7; their script: 10)")
    assert int(rows["r_max"][4]) == defaults.r_max
    assert float(rows["lr"][4]) == defaults.lr
    assert float(rows["max_grad_norm"][4]) == defaults.max_grad_norm
