"""What a user sees at the end of `sora-tune search`: where the search is recorded, its front
with the default rule's choice, what was left off and why, and the next commands."""

import os
import shutil

import mlflow
import yaml

from sora_tune.cli import main


def test_the_end_of_a_search_says_what_it_found(local_ray, tiny_trial, tmp_path, capsys):
    broken = tmp_path / "broken-model"  # a tokenizer and a config, but no weights
    broken.mkdir()
    for name in os.listdir(tiny_trial["model"]):
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(tiny_trial["model"], name), broken)
    parameters = tiny_trial | {
        "epochs": 1,
        "xi": {"type": "loguniform", "low": 1e-5, "high": 1e-4},
        "model": {"type": "choice", "values": [tiny_trial["model"], "broken-model"]},
    }
    points = [
        {"model": "broken-model", "xi": 1e-4},
        {"model": tiny_trial["model"], "xi": 1e-4},
    ]
    (tmp_path / "space.yaml").write_text(
        yaml.safe_dump({"parameters": parameters, "points_to_evaluate": points})
    )
    code = main(["search", "--config", "space.yaml", "--num-samples", "3", "--max-failures", "0"])
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0, captured.err
    summary = out[out.index("search sora-mrpc-") :]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (parent,) = client.search_runs(
        [client.get_experiment_by_name("sora-mrpc").experiment_id],
        "tags.`sora_tune.role` = 'search'",
    )
    parent_id = parent.info.run_id
    assert f"MLflow experiment 'sora-mrpc', parent run {parent_id}" in summary
    front = summary[summary.index("front (") : summary.index("hypervolume")]
    assert front.count("\n* ") == 1, "the default rule's choice is marked"
    assert "hypervolume " in summary
    failed = [line for line in summary.splitlines() if "failed:" in line]
    assert failed, "the broken model's trial is listed with its reason"
    for line in failed:
        assert "OSError" in line and os.path.exists(line.split("(log: ")[1].rstrip(")"))
    assert "pareto.png" in summary
    flags = f"--experiment sora-mrpc --parent-run-id {parent_id}"
    assert f"  sora-tune pareto {flags}" in summary
    assert f"  sora-tune register {flags} --name sora-mrpc" in summary
    assert "  sora-tune predict --model models:/sora-mrpc@champion --input rows.csv" in summary
    assert "--mlflow-uri" not in summary, "the default store needs no flag"

    # The printed command works as printed, from the same folder.
    capsys.readouterr()
    assert main(["pareto", *flags.split()]) == 0
    assert "selected" in capsys.readouterr().out
