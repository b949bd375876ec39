"""Replay searches on the recorded learning curves, on a simulated clock (#28 §3).

Every replay drives the search's real MO-ASHA scheduler and Ray's `OptunaSearch` with the
project's samplers (`sora_tune.tune.replay`) through the trials of the recorded table
(`scripts/record_curves.py`). For each trial budget and worker count, on each seed: random
search runs `budget` trials; its simulated end is the time budget of every other arm on that
seed (a search with Pareto stopping fits more trials in it, one with front-tracing fewer).

Resumable: one JSON line per (arm, budget, workers, seed) in `--output`, skipped when present
for the same table; the summary (`<output>.json`, `benchmark: replay`), the plot and the table
printed are made from every line. Seeds run in order, all arms of a seed together, so a cut
run leaves paired seeds.

    nice -n 10 python scripts/replay_search.py --trials 34 --budgets 200 --workers 8,32
    python scripts/replay_search.py --trials 34 --render-only
    python scripts/make_benchmarks_md.py
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import optuna  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from sora_tune.curves import append_line, read_table  # noqa: E402
from sora_tune.tune.replay import (  # noqa: E402
    ARMS,
    Clock,
    RecordedTable,
    bootstrap_band,
    goals,
    hypervolume_at,
    replay,
    stopped,
    summarize,
)

REPO = Path(__file__).resolve().parents[1]
BASELINE = "random"
# Room above the random arm's `budget` trials for arms that fit more in its time: a stopped
# trial still trains to the first rung, half a trial here, so at most about twice as many fit.
TRIAL_CAP = 3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--table", default=str(REPO / "docs/bench/curves.jsonl"), help="the recorded table"
    )
    parser.add_argument(
        "--trials",
        type=int,
        default=None,
        help="replay the first N recorded trials of the table (default: all); the table only "
        "grows, so the same N gives the same replays later",
    )
    parser.add_argument("--arms", default=",".join(ARMS), help=f"of {', '.join(ARMS)}")
    parser.add_argument("--budgets", default="200,1000", help="random search's trials")
    parser.add_argument("--workers", default="8,32", help="trials at once")
    parser.add_argument("--seeds", type=int, default=30, help="paired seeds 0..N-1")
    parser.add_argument(
        "--clock",
        choices=("median", "own"),
        default="median",
        help="median: each interval the median of the recorded trials of its adapter width "
        "(robust to other jobs' load); own: every trial's own recorded intervals",
    )
    parser.add_argument(
        "--output", default=str(REPO / "docs/bench/replay.jsonl"), help="one line per replay"
    )
    parser.add_argument("--render-only", action="store_true", help="summarise --output only")
    return parser.parse_args(argv)


def table_id(lines: list[dict[str, Any]]) -> str:
    """A digest of the replayed trials: lines of another table are never mixed in."""
    text = json.dumps(lines, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_one(table, clock, arm: str, seed: int, budget: int, workers: int, time_budget_s):
    began = time.perf_counter()
    search = replay(
        table,
        clock,
        ARMS[arm],
        seed=seed,
        workers=workers,
        num_samples=budget if arm == BASELINE else TRIAL_CAP * budget,
        sampler_samples=budget,
        time_budget_s=time_budget_s,
    )
    curve = search.curve(table.reference())
    return {
        "arm": arm,
        "budget": budget,
        "workers": workers,
        "seed": seed,
        "end_s": round(search.end_s, 1),
        "trials": len(search.trials),
        "stopped": sum(stopped(t) for t in search.trials),
        "cut": search.cut,
        "points": sum(len(search.points(t)) for t in search.ended()),
        "compute_s": round(search.compute_s(), 1),
        "curve": [[round(t, 1), float(f"{hv:.7g}")] for t, hv in curve],
        "wall_s": round(time.perf_counter() - began, 2),
    }


def plot(summary: dict[str, Any], lines: list[dict[str, Any]], path: Path) -> None:
    """Mean anytime hypervolume of every arm against simulated hours, with a 95% bootstrap
    band over seeds, one panel per (budget, workers)."""
    settings = summary["settings"]
    fig = Figure(figsize=(5 * len(settings), 4.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(settings), squeeze=False)[0])
    for ax, setting in zip(axes, settings.values(), strict=True):
        budget_s = setting["time_budget_s"]
        grid = np.linspace(0, budget_s, 200)
        for color, arm in enumerate(setting["arms"]):
            curves = [
                ln["curve"]
                for ln in lines
                if (ln["arm"], ln["budget"], ln["workers"])
                == (arm, setting["budget"], setting["workers"])
                and ln["seed"] in setting["seeds"]
            ]
            values = np.array([[hypervolume_at(c, t) for t in grid] for c in curves])
            mean, low, high = bootstrap_band(values)
            ax.plot(grid / 3600, mean, color=f"C{color}", label=arm)
            ax.fill_between(grid / 3600, low, high, color=f"C{color}", alpha=0.2)
        ax.set_title(
            f"{setting['budget']} trials, {setting['workers']} workers, "
            f"{len(setting['seeds'])} seeds",
            fontsize=9,
        )
        ax.set_xlabel("simulated time (h)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("hypervolume (val_score ↑, retained_params ↓)")
    axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=110)


def print_table(summary: dict[str, Any]) -> None:
    header = f"{'budget':>6}{'W':>4} {'arm':<12}{'seeds':>6}{'HV at budget':>14}{'median t/T':>12}{'≤1/3':>6}{'points/h':>10}{'trials':>8}{'p vs tpe':>10}"
    print(header)
    for setting in summary["settings"].values():
        for arm, entry in setting["arms"].items():
            p = entry["wilcoxon"].get("tpe", {}).get("hv_at_budget")
            share = entry["median_time_share"]
            print(
                f"{setting['budget']:>6}{setting['workers']:>4} {arm:<12}{entry['seeds']:>6}"
                f"{entry['hv_at_budget']:>14.6g}"
                f"{'never' if share == float('inf') else f'{share:.2f}':>12}"
                f"{entry['within_third']:>6}{entry['points_per_trial_hour']:>10.1f}"
                f"{entry['trials']:>8.0f}{'-' if p is None else f'{p:.3g}':>10}"
            )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # a line per trial otherwise
    first, recorded = read_table(args.table)
    if first is None:
        raise SystemExit(f"no recorded table at {args.table}: record first")
    recorded = recorded[: args.trials]
    digest = table_id(recorded)
    table = RecordedTable(first["design"], recorded)
    clock = Clock.fit(recorded) if args.clock == "median" else Clock.own(recorded)
    output = Path(args.output)
    _, lines = read_table(output) if output.exists() else (None, [])
    lines = [ln for ln in lines if ln.get("table") == digest and ln.get("clock") == args.clock]
    if not args.render_only:
        if not output.exists():
            append_line(output, {"design": "replays, one line each (scripts/replay_search.py)"})
        done = {(ln["arm"], ln["budget"], ln["workers"], ln["seed"]) for ln in lines}
        arms = [BASELINE] + [a for a in args.arms.split(",") if a != BASELINE]
        for budget in map(int, args.budgets.split(",")):
            for workers in map(int, args.workers.split(",")):
                for seed in range(args.seeds):
                    base = next(
                        (
                            ln
                            for ln in lines
                            if (ln["arm"], ln["budget"], ln["workers"], ln["seed"])
                            == (BASELINE, budget, workers, seed)
                        ),
                        None,
                    )
                    for arm in arms:
                        if (arm, budget, workers, seed) in done:
                            continue
                        time_budget_s = None if arm == BASELINE else base["end_s"]
                        line = run_one(table, clock, arm, seed, budget, workers, time_budget_s)
                        line |= {"table": digest, "clock": args.clock}
                        append_line(output, line)
                        lines.append(line)
                        base = line if arm == BASELINE else base
                        print(
                            f"{budget} trials, {workers} workers, seed {seed}, {arm}: "
                            f"HV {line['curve'][-1][1] if line['curve'] else 0:.6g}, "
                            f"{line['trials']} trials, {line['wall_s']:.1f} s",
                            flush=True,
                        )
    settings = summarize(lines, baseline=BASELINE)
    command = ["python", "scripts/replay_search.py"]
    command += [] if args.trials is None else ["--trials", str(args.trials)]
    command += ["--budgets", args.budgets, "--workers", args.workers, "--seeds", str(args.seeds)]
    summary = {
        "benchmark": "replay",
        "command": shlex.join(command),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "table": {
            "name": Path(args.table).name,
            "trials": len(recorded),
            "configurations": len(table.configs),
            "digest": digest,
        },
        "design": {k: first["design"][k] for k in ("threshold_quantiles", "threshold_every")},
        "clock": {"kind": args.clock} | dataclasses.asdict(clock),
        "reference": table.reference(),
        "replays": len(lines),
        "replay_wall_s": round(sum(ln["wall_s"] for ln in lines), 1),
        "settings": settings,
        "goals": {key: goals(setting) for key, setting in settings.items()},
        "lines": output.name,
        "plot": output.with_suffix(".png").name,
    }
    output.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    if settings:
        plot(summary, lines, output.with_suffix(".png"))
    print_table(summary)
    return summary


if __name__ == "__main__":
    main()
