"""Search efficiency: the hypervolume of the (val_score, retained_params) front after n trials.

Optuna's multi-objective TPE against random search, on a cheap real proxy (issue #6). The question:
does the smart search reach, in N trials, the front that random search reaches in 2N?

For every seed and sampler, one Optuna study (maximise val_score, minimise retained_params) runs 2N
trials through Optuna's ask/tell API, with the sampler the search uses (`make_sampler`) and the
search space's distributions as the search hands them to Optuna (`SearchSpace.to_tune`, then Ray's
`OptunaSearch.convert_search_space`). The space's `points_to_evaluate` are left out, so each sampler
is measured from its first proposal. Every trial is a real `train_trial` with the space's fixed
settings and this script's proxy settings (MiniLM, a GLUE subset, short training), on data
tokenised once.

Ray is not used: this measures how good the proposals are per trial, not how fast trials run, and a
plain loop proposes what the search proposes when its trials run one at a time, without Ray's start
and scheduling costs (`bench_search.py` measures those).

Every trial trains with the same seed on the same data, so a trial is a deterministic function of
its parameters and the seeds vary only the samplers. A trial whose parameters equal an earlier
one's (in any study of the run) reuses that result, marked `reused`. That matters: TPE's first
`n_startup_trials` (10) proposals are random draws identical to `RandomSampler`'s with the same
seed, so HV_TPE(n) = HV_random(n) for n <= 10, and N must exceed 10 for the question to test TPE.

Hypervolume uses one reference point for the whole run, `default_reference` over every finished
trial of every study: (val_score 0, 1.1 × the largest retained_params), so all curves share units.
A trial that diverged or raised is recorded with its status, told to Optuna as failed, and adds no
volume. Prints a table, writes JSON and a PNG of the mean curves beside it.

    python scripts/bench_hypervolume.py --num-trials 16 --seeds 0,1,2 --output docs/bench/hypervolume.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import optuna  # noqa: E402
import torch  # noqa: E402
from transformers.utils.logging import disable_progress_bar  # noqa: E402

from sora_tune.config import (
    DATA_FIELDS,  # noqa: E402
    literal_choices,  # noqa: E402
)
from sora_tune.front import (  # noqa: E402
    OBJECTIVES,  # noqa: E402
    default_reference,
    hypervolume,
)
from sora_tune.train import (  # noqa: E402
    TrialConfig,
    default_model,
    load_tokenizer,
    prepare_data,
    train_trial,
)
from sora_tune.tune import SearchSpace, load_search_space  # noqa: E402
from sora_tune.tune.config import SearchConfig  # noqa: E402
from sora_tune.tune.search import make_sampler  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DIRECTIONS = tuple(OBJECTIVES.values())
BASELINE = "random"  # the sampler every other one is compared with

# The cheap proxy (placeholders, to be tuned to ~10 s per trial on 2 cores).
# STS-B: its correlation moves at this tiny budget, where MRPC's accuracy stays at the majority class.
TASK = "stsb"
NUM_TRIALS = 16  # N: each study runs 2N; TPE's first 10 are random, so N > 10
TRAIN_ROWS = 200  # training rows (max_train_samples)
EVAL_ROWS = 100  # rows of val and test each (max_eval_samples)
TRAIN_EVAL_ROWS = 32  # training rows scored per epoch (train_eval_samples); not an objective
EPOCHS = 1  # passes over the training rows
MAX_LENGTH = 64  # tokens per sequence
BATCH_SIZE = 8  # training rows per step (the trial default)


def _list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--num-trials", type=int, default=NUM_TRIALS, help="N: every study runs 2N trials"
    )
    parser.add_argument(
        "--seeds", default="0,1,2", help="comma-separated sampler seeds, one study per sampler each"
    )
    parser.add_argument(
        "--samplers",
        default="tpe,random",
        help=f"comma-separated Optuna samplers ({', '.join(literal_choices(SearchConfig, 'sampler'))}); {BASELINE} is the baseline",
    )
    parser.add_argument(
        "--space",
        default=str(REPO / "search_spaces" / "quickstart.yaml"),
        help="search-space YAML: its distributions are searched, its fixed values kept",
    )
    parser.add_argument("--task", default=TASK, help="GLUE task")
    parser.add_argument(
        "--data-dir",
        default=str(REPO.parent / "shared" / "data" / "glue"),
        help="folder in the official GLUE layout (<dir>/<TASK>/train.tsv)",
    )
    parser.add_argument("--model", default=default_model(), help="backbone name or folder")
    parser.add_argument("--max-train-samples", type=int, default=TRAIN_ROWS, help="training rows")
    parser.add_argument(
        "--max-eval-samples", type=int, default=EVAL_ROWS, help="rows of val and test each"
    )
    parser.add_argument(
        "--train-eval-samples",
        type=int,
        default=TRAIN_EVAL_ROWS,
        help="training rows scored per epoch",
    )
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="epochs per trial")
    parser.add_argument("--max-length", type=int, default=MAX_LENGTH, help="tokens per sequence")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="training rows per step")
    parser.add_argument(
        "--runs-dir",
        default=None,
        help="where trial folders go (a new subfolder); default a temporary folder, removed after",
    )
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch threads for training"
    )
    parser.add_argument(
        "--output",
        default=str(REPO / "docs" / "bench" / "hypervolume.json"),
        help="where to write the JSON (and the PNG of the curves beside it)",
    )
    args = parser.parse_args(argv)
    args.seeds = [int(seed) for seed in _list(args.seeds)]
    args.samplers = list(dict.fromkeys(_list(args.samplers)))
    unknown = [s for s in args.samplers if s not in literal_choices(SearchConfig, "sampler")]
    if unknown:
        parser.error(
            f"--samplers: unknown {unknown} (known: {', '.join(literal_choices(SearchConfig, 'sampler'))})"
        )
    if args.num_trials < 1 or not args.seeds or not args.samplers:
        parser.error("need --num-trials >= 1, at least one seed and at least one sampler")
    return args


def proxy_space(args: argparse.Namespace, cache_dir: str) -> SearchSpace:
    """The space of `--space` with the proxy's settings fixed (they win over the YAML).

    Raises:
        ValueError: the space searches a setting that changes the data (it is prepared once).
    """
    space = load_search_space(args.space)
    overrides = {
        "task": args.task,
        "data_dir": args.data_dir,
        "model": args.model,
        "max_train_samples": args.max_train_samples,
        "max_eval_samples": args.max_eval_samples,
        "train_eval_samples": args.train_eval_samples,
        "epochs": args.epochs,
        "max_length": args.max_length,
        "batch_size": args.batch_size,
    }
    if "cache_dir" not in space.fixed:
        overrides["cache_dir"] = cache_dir
    space = space.with_fixed(overrides)
    searched = sorted(set(DATA_FIELDS) & set(space.distributions))
    if searched:
        raise ValueError(f"{args.space} searches {searched}; the data is prepared once here")
    return space


def optuna_distributions(space: SearchSpace) -> dict:
    """Optuna distributions of the searched parameters, converted as the search converts them."""
    from ray.tune.search.optuna import OptunaSearch  # the conversion only; Ray is not started

    return OptunaSearch.convert_search_space(space.to_tune())


def run_trial(config: dict, data, output_dir: Path) -> dict:
    """One training run: its objectives, status and seconds. A trial that raises is a result
    here (the search retries or records it), not the end of the benchmark."""
    start = time.perf_counter()
    try:
        result = train_trial(config, output_dir=output_dir, data=data)
    except Exception as err:
        return {
            "status": "error",
            "error": f"{type(err).__name__}: {err}",
            "seconds": time.perf_counter() - start,
        }
    row = {
        "status": result.get("status", "error"),
        "val_score": result.get("val_score"),
        "retained_params": result.get("retained_params"),
        "seconds": time.perf_counter() - start,
    }
    values = (row["val_score"], row["retained_params"])
    if row["status"] == "finished" and not all(
        isinstance(v, int | float) and math.isfinite(v) for v in values
    ):
        row["status"] = "non-finite objectives"
    if row["status"] != "finished":
        row["val_score"] = row["retained_params"] = None
    return row


def run_study(
    sampler: str,
    seed: int,
    *,
    num_trials: int,
    space: SearchSpace,
    distributions: dict,
    data,
    runs_dir: Path,
    done: dict[str, dict],
) -> list[dict]:
    """`num_trials` ask/tell rounds of one study; `done` maps parameters (as JSON) to results
    already trained in this run, and is updated."""
    study = optuna.create_study(directions=list(DIRECTIONS), sampler=make_sampler(sampler, seed))
    trials = []
    for number in range(num_trials):
        trial = study.ask(fixed_distributions=distributions)
        key = json.dumps(trial.params, sort_keys=True)
        reused = key in done
        if not reused:
            folder = runs_dir / f"{sampler}-seed{seed}" / f"trial-{number:03d}"
            done[key] = run_trial(space.fixed | trial.params, data, folder)
        row = {"number": number, "params": trial.params, **done[key], "reused": reused}
        if row["status"] == "finished":
            study.tell(trial, [row["val_score"], row["retained_params"]])
        else:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        trials.append(row)
        outcome = (
            f"val_score {row['val_score']:.4f}, retained_params {row['retained_params']:.0f}"
            if row["status"] == "finished"
            else row["status"]
        )
        print(
            f"{sampler} seed {seed} trial {number + 1}/{num_trials}: {outcome}, "
            f"{row['seconds']:.1f} s{' (reused)' if reused else ''}",
            flush=True,
        )
    return trials


def _objectives(trials: list[dict]) -> np.ndarray:
    """(n, 2) objectives; NaN rows for trials that did not finish (they add no volume)."""
    rows = [
        [t["val_score"], t["retained_params"]] if t["status"] == "finished" else [math.nan] * 2
        for t in trials
    ]
    return np.array(rows, dtype=float).reshape(-1, 2)


def hypervolume_curve(trials: list[dict], reference: tuple[float, ...] | None) -> list[float]:
    """The hypervolume of the first n trials' front, for n = 1 .. len(trials)."""
    if reference is None:
        return [0.0] * len(trials)
    values = _objectives(trials)
    return [hypervolume(values[:n], DIRECTIONS, reference) for n in range(1, len(trials) + 1)]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarize(studies: dict[str, dict[str, dict]], budget: int) -> dict:
    """Mean ± std curves per sampler over seeds, and every other sampler at N against the
    baseline at 2N (and both at N and 2N), per seed and on average."""
    curves = {}
    for sampler, by_seed in studies.items():
        stacked = np.array([study["hypervolume"] for study in by_seed.values()])
        curves[sampler] = {
            "mean": stacked.mean(axis=0).tolist(),
            "std": (stacked.std(axis=0, ddof=1) if len(stacked) > 1 else 0 * stacked[0]).tolist(),
        }
    comparisons = {}
    baseline = studies.get(BASELINE)
    for sampler, by_seed in studies.items():
        if baseline is None or sampler == BASELINE:
            continue
        per_seed = {}
        for seed, study in by_seed.items():
            hv, base = study["hypervolume"], baseline[seed]["hypervolume"]
            per_seed[seed] = {
                "hv_at_n": hv[budget - 1],
                "hv_at_2n": hv[2 * budget - 1],
                "baseline_at_n": base[budget - 1],
                "baseline_at_2n": base[2 * budget - 1],
                "ratio": hv[budget - 1] / base[2 * budget - 1] if base[2 * budget - 1] else None,
                "reached": hv[budget - 1] >= base[2 * budget - 1],
            }
        mean = {
            key: _mean_std([entry[key] for entry in per_seed.values()])[0]
            for key in ("hv_at_n", "hv_at_2n", "baseline_at_n", "baseline_at_2n")
        }
        comparisons[sampler] = {
            "per_seed": per_seed,
            "mean": mean,
            "ratio_of_means": mean["hv_at_n"] / mean["baseline_at_2n"]
            if mean["baseline_at_2n"]
            else None,
            "seeds_reached": sum(entry["reached"] for entry in per_seed.values()),
            "seeds": len(per_seed),
        }
    return {"budget": budget, "baseline": BASELINE, "curves": curves, "comparisons": comparisons}


def write_plot(summary: dict, scale: float, path: Path) -> None:
    """Mean ± std hypervolume curves, as a share of `scale` (the front of all trials)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    for sampler, curve in summary["curves"].items():
        mean, std = np.array(curve["mean"]) / scale, np.array(curve["std"]) / scale
        n = np.arange(1, len(mean) + 1)
        ax.plot(n, mean, marker=".", label=sampler)
        ax.fill_between(n, mean - std, mean + std, alpha=0.2)
    budget = summary["budget"]
    ax.axvline(budget, color="grey", linestyle="--", linewidth=1, label=f"N = {budget}")
    if BASELINE in summary["curves"]:
        level = summary["curves"][BASELINE]["mean"][2 * budget - 1] / scale
        ax.axhline(level, color="grey", linestyle=":", linewidth=1, label=f"{BASELINE} at 2N")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trials")
    ax.set_ylabel("hypervolume ÷ that of all trials")
    ax.set_title("Mean ± std over seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_table(result: dict) -> None:
    summary, budget = result["summary"], result["summary"]["budget"]
    scale = result["hv_all_trials"] or 1.0
    print(f"\nhypervolume as a share of the front of all trials; reference {result['reference']}")
    print(
        f"{'sampler':<10}{'seed':>6}{'HV(N)':>9}{'HV(2N)':>9}{'finished':>10}{'trained':>9}{'s':>8}"
    )
    for sampler, by_seed in result["studies"].items():
        for seed, study in by_seed.items():
            trials = study["trials"]
            finished = sum(t["status"] == "finished" for t in trials)
            trained = [t for t in trials if not t["reused"]]
            print(
                f"{sampler:<10}{seed:>6}{study['hypervolume'][budget - 1] / scale:>9.1%}"
                f"{study['hypervolume'][-1] / scale:>9.1%}{finished:>6}/{len(trials):<3}"
                f"{len(trained):>9}{sum(t['seconds'] for t in trained):>8.0f}"
            )
    for sampler, comparison in summary["comparisons"].items():
        print(f"\n{sampler} after N={budget} vs {BASELINE} after 2N={2 * budget}:")
        for seed, entry in comparison["per_seed"].items():
            print(
                f"  seed {seed}: {entry['hv_at_n'] / scale:.1%} vs "
                f"{entry['baseline_at_2n'] / scale:.1%} ({'reached' if entry['reached'] else 'not reached'})"
            )
        mean = comparison["mean"]
        print(
            f"  mean: {mean['hv_at_n'] / scale:.1%} vs {mean['baseline_at_2n'] / scale:.1%}; "
            f"reached in {comparison['seeds_reached']} of {comparison['seeds']} seeds"
        )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    disable_progress_bar()  # transformers' weight-loading bar, once per trial
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    output = Path(args.output)
    wall_start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if args.runs_dir is None:
            runs_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-hv-")))
        else:
            Path(args.runs_dir).mkdir(parents=True, exist_ok=True)
            runs_dir = Path(tempfile.mkdtemp(prefix="bench-hv-", dir=args.runs_dir))
        space = proxy_space(args, cache_dir=str(runs_dir / "cache"))
        distributions = optuna_distributions(space)
        fixed = TrialConfig.from_dict(space.fixed)
        data = prepare_data(fixed, load_tokenizer(fixed))  # tokenised once for every trial

        startup = {s: getattr(make_sampler(s, 0), "_n_startup_trials", None) for s in args.samplers}
        for sampler, count in startup.items():
            if count is not None and args.num_trials <= count:
                print(
                    f"warning: {sampler}'s first {count} trials are random draws; with N = "
                    f"{args.num_trials} its HV(N) only measures random search",
                    flush=True,
                )

        done: dict[str, dict] = {}
        studies: dict[str, dict[str, dict]] = {s: {} for s in args.samplers}
        for seed in args.seeds:
            for sampler in args.samplers:
                studies[sampler][str(seed)] = {
                    "trials": run_study(
                        sampler,
                        seed,
                        num_trials=2 * args.num_trials,
                        space=space,
                        distributions=distributions,
                        data=data,
                        runs_dir=runs_dir,
                        done=done,
                    )
                }

    every = [t for by_seed in studies.values() for s in by_seed.values() for t in s["trials"]]
    values = _objectives(every)
    finished = values[~np.isnan(values).any(axis=1)]
    reference = default_reference(finished, DIRECTIONS) if len(finished) else None
    if reference is None:
        print("warning: no trial finished; every hypervolume is 0", flush=True)
    for by_seed in studies.values():
        for study in by_seed.values():
            study["hypervolume"] = hypervolume_curve(study["trials"], reference)
    hv_all = hypervolume(finished, DIRECTIONS, reference) if reference is not None else 0.0
    summary = summarize(studies, args.num_trials)

    result = {
        "benchmark": "hypervolume",
        "command": "python scripts/bench_hypervolume.py "
        + shlex.join(sys.argv[1:] if argv is None else argv),
        "config": {
            **vars(args),
            "argv": sys.argv if argv is None else ["scripts/bench_hypervolume.py", *argv],
            "trial": {k: v for k, v in space.fixed.items() if k != "cache_dir"},
            "distributions": space.distributions,
            "sampler_startup_trials": startup,
        },
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": args.threads,
            "note": "another job may share the CPU",
        },
        "objectives": dict(zip(OBJECTIVES, DIRECTIONS, strict=True)),
        "reference": list(reference) if reference is not None else None,
        "hv_all_trials": hv_all,
        "trials_trained": sum(not t["reused"] for t in every),
        "trials_failed": sum(t["status"] != "finished" for t in every),
        "wall_s": time.perf_counter() - wall_start,
        "summary": summary,
        "studies": studies,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    if hv_all > 0:
        plot = output.with_suffix(".png")
        write_plot(summary, hv_all, plot)
        result["plot"] = plot.name
    with open(output, "w") as handle:
        json.dump(result, handle, indent=2)

    print_table(result)
    print(
        f"\n{result['trials_trained']} trials trained in {result['wall_s']:.0f} s; wrote {output}"
    )
    return result


if __name__ == "__main__":
    main()
