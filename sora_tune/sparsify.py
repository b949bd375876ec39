"""The paper's sparsifying scheduler (Algorithm 1): train dense, then raise ξ stage by stage and
trace memorization (train score) and generalization (val score) against the retained parameters.

Writes `sparsify.csv`, `sparsify.png` (the paper's Figure 2) and `ranks.png` (Figure 3: the final
rank of every module by layer).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .config import TrialConfig  # noqa: E402
from .train import train_trial  # noqa: E402

CURVE_COLUMNS = (
    "stage",
    "epoch",
    "xi",
    "retained_params",
    "train_score",
    "val_score",
    "test_score",
)


def run_sparsify(
    config: TrialConfig, output_dir: str | Path, *, progress: bool = False
) -> list[dict]:
    """Run the schedule of `config` (which must rise) for exactly its length and record the end of
    every stage. Returns the curve rows (`CURVE_COLUMNS`). `TrialConfig.for_schedule` builds a
    config of the right length.

    Raises:
        ValueError: a constant ξ schedule (nothing to trace), a LoRA/AdaLoRA method, or epochs
            other than the schedule's length.
    """
    if config.method != "sora":
        raise ValueError(f"sparsify needs method sora, got {config.method!r}")
    schedule = config.xi_plan()
    if schedule.kind == "constant":
        raise ValueError("sparsify needs a rising xi schedule: set xi_schedule and xi_max")
    if config.epochs != schedule.length:
        raise ValueError(
            f"sparsify runs the xi schedule for exactly its length, {schedule.length} "
            f"epochs; epochs is {config.epochs}"
        )
    output_dir = Path(output_dir)
    result = train_trial(config, output_dir=output_dir, progress=progress)
    # From the whole history, not from reports: a resumed or rerun sweep keeps its earlier stages.
    rows = [
        {k: metrics[k] for k in CURVE_COLUMNS if k in metrics}
        for metrics in result["history"]
        if metrics["stage_end"]
    ]
    write_curve(rows, output_dir / "sparsify.csv")
    plot_curve(rows, output_dir / "sparsify.png", task=config.data_name)
    if result.get("rank_pattern"):
        plot_rank_heatmap(result["rank_pattern"], output_dir / "ranks.png", r_max=config.r_max)
    return rows


def write_curve(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CURVE_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def plot_curve(rows: list[dict], path: Path, *, task: str) -> None:
    """Scores against retained parameters, one point per ξ stage (paper Figure 2)."""
    params = [r["retained_params"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(params, [r["train_score"] for r in rows], "o-", label="memorization (train)")
    ax.plot(params, [r["val_score"] for r in rows], "s-", label="generalization (val)")
    for row in rows:
        ax.annotate(f"ξ={row['xi']:.1e}", (row["retained_params"], row["val_score"]), fontsize=7)
    ax.set_xlabel("retained parameters")
    ax.set_ylabel(f"{task} score")
    ax.invert_xaxis()  # sparser to the right, as ξ rises
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_rank_heatmap(pattern: dict[str, int], path: Path, *, r_max: int) -> None:
    """Final rank of every adapted module: layers as columns, module kinds as rows (Figure 3)."""
    cells: dict[tuple[str, int], int] = {}
    for name, rank in pattern.items():
        match = re.search(r"layer\.(\d+)\.(.+)$", name)
        if match:
            cells[(match.group(2), int(match.group(1)))] = rank
    kinds = sorted({kind for kind, _ in cells})
    layers = sorted({layer for _, layer in cells})
    grid = np.full((len(kinds), len(layers)), np.nan)
    for (kind, layer), rank in cells.items():
        grid[kinds.index(kind), layers.index(layer)] = rank
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(layers), 1 + 0.45 * len(kinds)))
    image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=r_max, aspect="auto")
    for i, j in np.ndindex(grid.shape):
        if not np.isnan(grid[i, j]):
            ax.text(j, i, int(grid[i, j]), ha="center", va="center", color="w", fontsize=8)
    ax.set_xticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_yticks(range(len(kinds)), kinds)
    ax.set_xlabel("layer")
    fig.colorbar(image, ax=ax, label="final rank")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
