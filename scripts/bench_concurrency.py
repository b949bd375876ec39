"""How many trials at once a model-based sampler can take: hypervolume after N trials against
the number of trials running side by side, with the samplers as `run_search` builds them.

Simulated, not trained: each trial is a draw of sora-tune's usual search space (r_max, lr,
xi_total) scored by a smooth synthetic objective with noise (a peak in lr, fewer ranks kept as
xi_total grows, a small loss per pruned rank), and trial durations are lognormal, so trials end
out of order as on a real cluster. `c` workers ask Optuna for a trial whenever one is free and
tell it the trial's values when it ends, as Ray's `OptunaSearch` does. This isolates what
concurrency does to the sampler from training noise, in seconds instead of GPU-hours; the
numbers are about the samplers on this objective, not about any task's scores.

    python scripts/bench_concurrency.py --output docs/bench/concurrency.json
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import platform
import shlex
import sys
from typing import Any

import numpy as np
import optuna

from sora_tune.front import hypervolume
from sora_tune.tune.config import default_max_concurrent
from sora_tune.tune.search import make_sampler

DIRECTIONS = ["maximize", "minimize"]
PARAMS_PER_RANK = 36 * 768  # adapted modules × (in + out) / 2 of a BERT-base-sized encoder
REFERENCE = (0.0, 1.1 * 8 * PARAMS_PER_RANK)  # val_score 0, 1.1 × the largest adapter


def synthetic_trial(trial: optuna.Trial, rng: np.random.Generator) -> tuple[float, float]:
    """(val_score, retained_params) of one simulated trial."""
    r_max = trial.suggest_categorical("r_max", [2, 4, 8])
    lr = trial.suggest_float("lr", 5e-4, 5e-3, log=True)
    xi_total = trial.suggest_float("xi_total", 0.05, 2.0, log=True)
    kept = np.exp(-1.2 * xi_total)  # share of ranks the threshold leaves
    score = 0.85 - 0.32 * np.log10(lr / 2e-3) ** 2 - 0.05 * (1 - kept) ** 2 - 0.03 / r_max
    return float(score + rng.normal(0, 0.01)), float(r_max * kept * PARAMS_PER_RANK)


def simulate(sampler: str, num_samples: int, concurrent: int, seed: int) -> float:
    """The hypervolume of `num_samples` trials run `concurrent` at a time."""
    rng = np.random.default_rng(seed)
    study = optuna.create_study(
        directions=DIRECTIONS, sampler=make_sampler(sampler, seed, num_samples=num_samples)
    )
    running: list[tuple[float, int, optuna.Trial, tuple[float, float]]] = []

    def start(now: float) -> None:
        trial = study.ask()
        values = synthetic_trial(trial, rng)
        heapq.heappush(running, (now + rng.lognormal(0, 0.3), trial.number, trial, values))

    for _ in range(min(concurrent, num_samples)):
        start(0.0)
    started = len(running)
    while running:
        now, _, trial, values = heapq.heappop(running)
        study.tell(trial, values)
        if started < num_samples:
            start(now)
            started += 1
    values = np.array([t.values for t in study.trials])
    return hypervolume(values, DIRECTIONS, REFERENCE)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samplers", default="tpe,nsga2,random", help="comma-separated")
    parser.add_argument("--num-samples", default="16,32", help="search sizes, comma-separated")
    parser.add_argument("--concurrent", default="1,2,4,8,16,32", help="comma-separated")
    parser.add_argument("--seeds", type=int, default=20, help="sampler seeds per cell")
    parser.add_argument("--output", default="bench_concurrency.json", help="the JSON written")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    rows = []
    for sampler in args.samplers.split(","):
        for num_samples in map(int, args.num_samples.split(",")):
            for concurrent in map(int, args.concurrent.split(",")):
                if concurrent > num_samples:
                    continue
                volumes = [simulate(sampler, num_samples, concurrent, s) for s in range(args.seeds)]
                rows.append(
                    {
                        "sampler": sampler,
                        "num_samples": num_samples,
                        "concurrent": concurrent,
                        "default": concurrent
                        == (default_max_concurrent(sampler, num_samples) or num_samples),
                        "hv_mean": float(np.mean(volumes)),
                        "hv_sem": float(np.std(volumes, ddof=1) / np.sqrt(len(volumes))),
                    }
                )
                row = rows[-1]
                print(
                    f"{sampler:7} n={num_samples:<3} c={concurrent:<3} "
                    f"hv {row['hv_mean']:>9.0f} ± {row['hv_sem']:<6.0f}"
                    f"{'  (default)' if row['default'] else ''}",
                    flush=True,
                )
    data = {
        "benchmark": "concurrency",
        "command": "python scripts/bench_concurrency.py " + shlex.join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "config": {"seeds": args.seeds, "reference": list(REFERENCE)},
        "rows": rows,
    }
    with open(args.output, "w") as file:
        json.dump(data, file, indent=1)
    return data


if __name__ == "__main__":
    main()
