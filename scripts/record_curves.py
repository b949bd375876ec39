"""Record learning curves on the STS-B proxy, for replaying searches on a simulated clock (#28 §2).

A Latin hypercube of `--configurations` points over the searched parameters of `--space` (by
default `quickstart`, the space of the README's Quickstart: `search` has no built-in one), each
trained with every seed of `--seeds` on `sora_tune.curves.PROXY` (MiniLM, 600 STS-B training
rows, 2 epochs: 150 optimizer steps, an evaluation every 15 steps), every evaluation and the
post-hoc gate-threshold points in one JSON line a trial (`sora_tune.curves`). Resumable: run the
same command again and it skips the recorded trials and reruns an interrupted one.

Measured (2 cores, 1 torch thread, niced): a trial takes 139 s with the machine otherwise idle
and 183 s beside another job's tests, about 30 s of it scoring the gate thresholds; the default
40 configurations × 2 seeds take 3.1 to 4.1 hours.

    OMP_NUM_THREADS=1 nice -n 19 python scripts/record_curves.py    # record, or resume
    python scripts/record_curves.py --report    # rank correlations -> docs/bench/curves.json
    python scripts/make_benchmarks_md.py       # the section in docs/benchmarks.md

`--staged` records §4's option (a) instead, in docs/bench/curves_staged.jsonl: each trial of the
same design trained as a front-tracing trial that trains on through its stages
(`sora_tune.curves.STAGED`), without threshold points; pair its lines with the constant trials'
by `config` and `seed` (its `params` keep the constant trial's searched values).

    OMP_NUM_THREADS=1 nice -n 19 python scripts/record_curves.py --staged --limit 16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from sora_tune.curves import (  # noqa: E402
    PROXY,
    STAGED,
    design_header,
    design_runs,
    rank_correlations,
    read_table,
    record_curves,
    staged_run,
)
from sora_tune.experiments import PreparedData  # noqa: E402
from sora_tune.tune.replay import compare_tracing  # noqa: E402
from sora_tune.tune.space import load_search_space  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--space", default="quickstart", help="search space: a shipped name or a YAML"
    )
    # 40 configurations × 2 seeds fit in about 4 hours at the measured time of a trial (above).
    parser.add_argument("--configurations", type=int, default=40, help="points of the design")
    parser.add_argument("--seeds", default="0,1", help="trial seeds of every configuration")
    parser.add_argument("--design-seed", type=int, default=0, help="seed of the Latin hypercube")
    parser.add_argument("--proxy", default="{}", help="JSON overriding the proxy's settings")
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("SORA_TUNE_DATA_DIR") or str(REPO.parent / "shared/data/glue"),
        help="GLUE folder (default $SORA_TUNE_DATA_DIR or ../shared/data/glue)",
    )
    parser.add_argument("--model", default=None, help="backbone (default the packaged MiniLM)")
    parser.add_argument(
        "--staged",
        action="store_true",
        help="record option (a) of #28 §4: the design's trials as front-tracing trials that train "
        "on through stages (default output docs/bench/curves_staged.jsonl)",
    )
    parser.add_argument(
        "--output",
        default=None,
        help="the JSON Lines table (default docs/bench/curves.jsonl, or curves_staged.jsonl)",
    )
    parser.add_argument(
        "--work-dir",
        default=None,
        help="where each trial trains (default runs/curves, or runs/curves_staged)",
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="record only the first N trials of the design"
    )
    # One thread leaves the machine's other core to whoever shares it; the time a trial takes
    # was measured so.
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument(
        "--report",
        action="store_true",
        help="record nothing: print the rank correlations of the table and write them, beside "
        "it, as <output>.json",
    )
    return parser.parse_args(argv)


def report(args: argparse.Namespace) -> dict[str, Any]:
    """The rank correlations of the recorded table, printed and written as JSON for
    make_benchmarks_md.py."""
    first, lines = read_table(args.output)
    if not lines:
        raise SystemExit(f"no trial recorded in {args.output}: record first")
    analysis = rank_correlations(lines)
    design = first["design"]
    result = {
        "benchmark": "curves",
        "command": "\n".join(
            [first["started"].get("command", ""), "python scripts/record_curves.py --report"]
        ),
        "machine": first["started"].get("machine", {}),
        "config": design,
        "table": Path(args.output).name,
        "recorded": len(lines),
        "planned": design["configurations"] * len(design["seeds"]),
        "analysis": analysis,
    }
    path = Path(args.output).with_suffix(".json")
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"{'step':>6}{'epoch':>8}{'ρ val_score':>13}{'ρ retained':>12}  ({analysis['trials']} trials)"
    )
    for row in analysis["rows"]:
        cells = [
            f"{row[k]:.3f}" if row[k] is not None else "-" for k in ("val_score", "retained_params")
        ]
        print(f"{row['step']:>6}{row['epoch']:>8}{cells[0]:>13}{cells[1]:>12}")
    print(analysis["summary"])
    return result


def report_tracing(args: argparse.Namespace) -> dict[str, Any]:
    """§4's comparison of the staged table with the constant trials' threshold points
    (`replay.compare_tracing`), printed and written as JSON for make_benchmarks_md.py."""
    first, staged = read_table(args.output)
    _, constant = read_table(Path(args.output).with_name("curves.jsonl"))
    if not staged:
        raise SystemExit(f"no trial recorded in {args.output}: record first")
    stage_steps = first["design"]["staged"]["xi_every_steps"]
    comparison = compare_tracing(
        constant, staged, stage_steps=stage_steps, stages=STAGED["xi_stages"] - 1
    )
    result = {
        "benchmark": "tracing",
        "command": "\n".join(
            [
                first["started"].get("command", ""),
                "python scripts/record_curves.py --staged --report",
            ]
        ),
        "machine": first["started"].get("machine", {}),
        "config": first["design"],
        "table": Path(args.output).name,
        "comparison": comparison,
    }
    path = Path(args.output).with_suffix(".json")
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{len(comparison['pairs'])} trials, each as (a) stages and as (b) thresholds")
    print(
        f"{'way':<12}{'points':>8}{'trial-h':>9}{'pooled HV':>12}{'HV/trial-h':>12}{'points/h':>10}"
    )
    for way, entry in comparison["ways"].items():
        print(
            f"{way:<12}{entry['points']:>8}{entry['trial_hours']:>9.2f}"
            f"{entry['pooled_hypervolume']:>12.4g}{entry['pooled_hypervolume_per_trial_hour']:>12.4g}"
            f"{entry['points_per_trial_hour']:>10.1f}"
        )
    print(f"better: {comparison['better']}")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    suffix = "_staged" if args.staged else ""
    args.output = args.output or str(REPO / "docs/bench" / f"curves{suffix}.jsonl")
    args.work_dir = args.work_dir or str(REPO / "runs" / f"curves{suffix}")
    if args.report:
        return report_tracing(args) if args.staged else report(args)
    torch.set_num_threads(args.threads)
    overrides = PROXY | json.loads(args.proxy) | {"data_dir": args.data_dir}
    if args.model:
        overrides["model"] = args.model
    space = load_search_space(args.space).with_fixed(overrides).with_resolved_paths()
    seeds = [int(s) for s in args.seeds.split(",")]
    header = design_header(space, args.configurations, seeds, design_seed=args.design_seed)
    runs = design_runs(space, args.configurations, seeds, design_seed=args.design_seed)
    if args.staged:
        config = runs[0].config
        rows = len(PreparedData().of(config)["train"])
        steps_per_epoch = math.ceil(rows / config.batch_size)  # the loaders keep the last batch
        runs = [staged_run(run, steps_per_epoch) for run in runs]
        staged = runs[0].config
        header |= {
            "staged": STAGED | {"xi_every_steps": staged.xi_every_steps, "xi_max": staged.xi_max},
            "dense": "the constant trial's epochs at its xi per step",
        }

    def progress(position: int, total: int, line: dict[str, Any], before: bool) -> None:
        last = line["evaluations"][-1] if line["evaluations"] else {}
        print(
            f"{line['trial']} ({position}/{total}): "
            + ("recorded before" if before else f"{line['status']}, {line['wall_s']:.0f} s")
            + f", final val_score {last.get('val_score')}",
            flush=True,
        )

    started = {
        "command": shlex.join(["python", "scripts/record_curves.py", *argv]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
    }
    lines = record_curves(
        runs,
        header,
        args.output,
        args.work_dir,
        started=started,
        limit=args.limit,
        thresholds=not args.staged,
        on_trial=progress,
    )
    return {"lines": lines}


if __name__ == "__main__":
    main()
