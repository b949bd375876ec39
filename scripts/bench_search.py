"""Search overhead: the share of a search's wall time not spent training, and where it goes.

Runs a real search (`sora_tune.tune.run_search`: Ray Tune + Optuna, MLflow on a sqlite file in a
temporary folder) of `--num-samples` short SoRA trials on the packaged MiniLM and an MRPC subset.
With `--cpus-per-trial` equal to the CPUs given to Ray, trials run one at a time, so

    overhead = 1 - sum(trial train_time_s) / wall time

where the wall time runs from just before `ray.init` to the return of `run_search`, and a trial's
`train_time_s` is its training plus per-epoch evaluation (what the trial reports). The remainder is
split, using the clock times of the trials' MLflow runs (each trial creates its run first thing
and ends it last), into: Ray start (`ray.init`, timed here); data preparation, opening the MLflow
store and the search's parent run (the search's own calls, timed by wrapping them); the start of
the first trial (Tuner set-up, the trial actor's start and imports); the trials' time outside
training (their MLflow run span minus `train_time_s`: model load, data loaders, params,
checkpoints, pruning, export, artifacts; model load alone estimated from one `build_model` timed
here); the gaps between trials (Ray scheduling, Optuna); the end of the search; and the rest. The
trials' own MLflow logging is not separated from the rest of their time. Prints a table and
writes JSON.

    python scripts/bench_search.py --num-samples 8 --output bench_search.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import mlflow  # noqa: E402

import sora_tune.tune.search as search_module  # noqa: E402
from sora_tune.config import TrialConfig, default_model  # noqa: E402
from sora_tune.models import build_model  # noqa: E402
from sora_tune.tune import SearchConfig, SearchSpace, run_search  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# The searched parameters: those of search_spaces/quickstart.yaml.
DISTRIBUTIONS = {
    "xi": {"type": "loguniform", "low": 1.0e-5, "high": 1.0e-2},
    "eta": {"type": "loguniform", "low": 1.0e-2, "high": 0.5},
    "r_max": {"type": "choice", "values": [4, 8]},
    "lr": {"type": "loguniform", "low": 5.0e-4, "high": 5.0e-3},
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=8, help="trials in the search")
    parser.add_argument("--task", default="mrpc", help="GLUE task")
    parser.add_argument(
        "--data-dir",
        default=str(REPO.parent / "shared" / "data" / "glue"),
        help="folder in the official GLUE layout (<dir>/<TASK>/train.tsv)",
    )
    parser.add_argument("--model", default=default_model(), help="backbone name or folder")
    parser.add_argument("--max-train-samples", type=int, default=64, help="training rows")
    parser.add_argument("--max-eval-samples", type=int, default=32, help="rows of val and test")
    parser.add_argument(
        "--train-eval-samples", type=int, default=32, help="training rows scored per epoch"
    )
    parser.add_argument("--epochs", type=int, default=1, help="epochs per trial")
    parser.add_argument("--batch-size", type=int, default=8, help="training rows per step")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per sequence")
    parser.add_argument(
        "--num-cpus", type=int, default=os.cpu_count(), help="CPUs given to the local Ray"
    )
    parser.add_argument(
        "--cpus-per-trial",
        type=float,
        default=float(os.cpu_count() or 1),
        help="CPUs per trial; equal to --num-cpus runs the trials one at a time",
    )
    parser.add_argument("--sampler", default="tpe", help="Optuna sampler: tpe, nsga2, gp, random")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampler and the data")
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="tokenisation cache; default a new temporary folder (a cold cache)",
    )
    parser.add_argument("--output", default="bench_search.json", help="where to write the JSON")
    return parser.parse_args(argv)


@contextlib.contextmanager
def timed_calls(name: str, seconds: list[float], returned: list | None = None, module=None):
    """Time every call of `<module>.<name>` (default `sora_tune.tune.search`, which looks its
    helpers up at call time), keeping `(return value, clock time at return)` in `returned`."""
    module = module or search_module
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            value = original(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)
        if returned is not None:
            returned.append((value, time.time()))
        return value

    setattr(module, name, wrapper)
    try:
        yield
    finally:
        setattr(module, name, original)


def trial_rows(results, mlflow_uri: str, parent_run_id: str) -> list[dict]:
    """Per trial: the reported `train_time_s`, Ray's `time_total_s` and its MLflow run's clock
    times (seconds since the epoch), in start order."""
    client = mlflow.MlflowClient(mlflow_uri)
    runs = {
        run.data.tags.get("ray_trial_id"): run.info
        for run in client.search_runs(
            [client.get_run(parent_run_id).info.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
        )
    }
    rows = []
    for result in results:
        metrics = result.metrics or {}
        run = runs.get(metrics.get("trial_id"))
        rows.append(
            {
                "trial_id": metrics.get("trial_id"),
                "status": "error" if result.error else metrics.get("status", "finished"),
                "train_time_s": metrics.get("train_time_s"),
                "time_total_s": metrics.get("time_total_s"),
                "run_start": run.start_time / 1000 if run and run.start_time else None,
                "run_end": run.end_time / 1000 if run and run.end_time else None,
                "val_score": metrics.get("val_score"),
                "retained_params": metrics.get("retained_params"),
            }
        )
    return sorted(rows, key=lambda r: r["run_start"] or math.inf)


def split_wall(trials: list[dict], *, wall_end: float, parent_end: float) -> dict[str, float]:
    """The clock-time parts of the search that the trials' MLflow runs delimit."""
    ran = [t for t in trials if t["run_start"] and t["run_end"]]
    if not ran:
        return {}
    spans = [(t["run_start"], t["run_end"]) for t in ran]
    return {
        "first_trial_start_s": spans[0][0] - parent_end,
        "trial_non_training_s": sum(
            t["run_end"] - t["run_start"] - (t["train_time_s"] or 0.0) for t in ran
        ),
        "between_trials_s": sum(
            max(0.0, nxt[0] - cur[1]) for cur, nxt in zip(spans, spans[1:], strict=False)
        ),
        "search_end_s": wall_end - max(end for _, end in spans),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import ray

    if ray.is_initialized():
        raise RuntimeError("Ray is already initialised in this process: the Ray start is timed")
    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        config = search_config(args, Path(tmp))
        # One model load, as every trial does it (the search does not share models).
        start = time.perf_counter()
        build_model(TrialConfig.from_dict(config.space.fixed | {"r_max": 8}), total_steps=10)
        model_load_s = time.perf_counter() - start
        timing = time_search(config, num_cpus=args.num_cpus)

    result = {
        "benchmark": "search",
        "command": "python scripts/bench_search.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "config": vars(args),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "note": "another job may share the CPU",
        },
        **overhead(timing, model_load_s),
        "notes": NOTES,
        "trials": timing["trials"],
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump(result, handle, indent=2)
    print_table(result)
    print(f"wrote {args.output}")
    return result


def search_config(args: argparse.Namespace, tmp: Path) -> SearchConfig:
    """The benchmarked search: `DISTRIBUTIONS` over the fixed settings of the flags, its MLflow
    store and Ray storage in `tmp`."""
    fixed = {
        "task": args.task,
        "data_dir": args.data_dir,
        "model": args.model,
        "epochs": args.epochs,
        "max_train_samples": args.max_train_samples,
        "max_eval_samples": args.max_eval_samples,
        "train_eval_samples": args.train_eval_samples,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "seed": args.seed,
        "cache_dir": args.cache_dir or str(tmp / "cache"),
        "lam": 0.1,
    }
    space = SearchSpace(distributions=dict(DISTRIBUTIONS), fixed=fixed)
    space.validate("bench_search")
    return SearchConfig(
        space=space,
        num_samples=args.num_samples,
        sampler=args.sampler,
        cpus_per_trial=args.cpus_per_trial,
        storage_path=str(tmp / "ray_results"),
        mlflow_uri=f"sqlite:///{tmp}/mlflow.db",
        experiment_name="bench-search",
        sampler_seed=args.seed,
    )


def time_search(config: SearchConfig, *, num_cpus: int) -> dict:
    """Start Ray and run the search, timing Ray's start and the search's own calls; returns the
    clock times, the timed calls and the trials (`trial_rows`)."""
    import ray

    calls: dict[str, list[float]] = {name: [] for name in ("data", "parent", "close", "store")}
    parents: list[tuple[str, float]] = []
    wall_start = time.time()
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    ray_start_s = time.time() - wall_start
    try:
        with (
            timed_calls("prepare_data", calls["data"]),
            timed_calls("in_memory", calls["data"]),
            timed_calls("experiment_id_of", calls["store"]),
            timed_calls("start_parent_run", calls["parent"], parents),
            timed_calls("close_open_runs", calls["close"]),
        ):
            results = run_search(config).results
        wall_end = time.time()
    finally:
        ray.shutdown()
    return {
        "wall_start": wall_start,
        "wall_end": wall_end,
        "ray_start_s": ray_start_s,
        "parent_end": parents[0][1],
        "calls": {name: sum(seconds) for name, seconds in calls.items()},
        "trials": trial_rows(results, config.mlflow_uri, parents[0][0]),
    }


def overhead(timing: dict, model_load_s: float) -> dict:
    """The search's wall time split into training and the parts of `NOTES`."""
    trials, calls = timing["trials"], timing["calls"]
    wall_s = timing["wall_end"] - timing["wall_start"]
    train_s = sum(t["train_time_s"] or 0.0 for t in trials)
    parts = {
        "ray_start_s": timing["ray_start_s"],
        "data_preparation_s": calls["data"],
        "mlflow_store_s": calls["store"],
        "mlflow_parent_run_s": calls["parent"] + calls["close"],
        **split_wall(trials, wall_end=timing["wall_end"], parent_end=timing["parent_end"]),
    }
    # The search's end includes closing the parent run, counted above.
    if "search_end_s" in parts:
        parts["search_end_s"] -= calls["close"]
    parts["other_s"] = wall_s - train_s - sum(parts.values())
    return {
        "wall_s": wall_s,
        "train_time_s": train_s,
        "overhead": 1 - train_s / wall_s,
        "overhead_without_ray_start": 1 - train_s / (wall_s - timing["ray_start_s"]),
        "parts": parts,
        "included": {
            "model_load_estimate_s": model_load_s * len(trials),
            "trial_time_total_minus_train_s": sum(
                (t["time_total_s"] or 0.0) - (t["train_time_s"] or 0.0) for t in trials
            ),
        },
    }


NOTES = {
    "train_time_s": "training plus per-epoch evaluation, as each trial reports it",
    "data_preparation_s": "the search's prepare_data and in_memory calls",
    "mlflow_store_s": "the search's experiment_id_of: opening (here creating) the "
    "sqlite store and the experiment",
    "first_trial_start_s": "from the parent run's creation to the first trial's MLflow "
    "run: Tuner set-up, the trial actor's start and imports",
    "trial_non_training_s": "sum over trials of the MLflow run span minus "
    "train_time_s: model load, data loaders, params, checkpoints, pruning, export, "
    "artifacts",
    "between_trials_s": "gaps between one trial's run end and the next one's start: "
    "Ray scheduling, Optuna",
    "search_end_s": "from the last trial's run end to run_search's return, less closing "
    "the parent run",
    "other_s": "wall minus training and every part above",
    "model_load_estimate_s": "one build_model timed in the driver, times the trials; "
    "part of trial_non_training_s",
    "trial_time_total_minus_train_s": "the same from Ray's time_total_s (start of the "
    "trainable to its last report)",
    "mlflow": "the parent run is timed; the trials' own MLflow logging is not separated",
}


def print_table(result: dict) -> None:
    wall_s, train_s = result["wall_s"], result["train_time_s"]
    print(f"{len(result['trials'])} trials, wall {wall_s:.1f} s (another job may share the CPU)")
    print(f"{'part':<26}{'seconds':>10}{'share of wall':>15}")
    print(f"{'training (train_time_s)':<26}{train_s:>10.1f}{train_s / wall_s:>15.1%}")
    for name, seconds in result["parts"].items():
        print(f"{name:<26}{seconds:>10.1f}{seconds / wall_s:>15.1%}")
    for name, seconds in result["included"].items():
        print(f"  (included) {name:<33}{seconds:>8.1f}")
    print(
        f"overhead = {result['overhead']:.1%} (target <= 5%); without Ray start "
        f"{result['overhead_without_ray_start']:.1%}"
    )


if __name__ == "__main__":
    main()
