"""Peak memory of the search's driver while it shares a task's tokenised data with the trials.

The search tokenises once and puts the splits into Ray's object store (`tune.with_parameters`).
This measures the driver's peak resident memory (ru_maxrss) from start to the object store, in a
fresh process per variant, on a whole GLUE task (SST-2: 67k training rows):

- `arrow`: what the search does, `sora_tune.tune.search.in_memory`: each split's rows taken into
  an in-memory Arrow table;
- `python`: what it did before, every split turned into Python lists (`to_dict`) and back.

    python scripts/bench_data_sharing.py --task sst2 --output docs/bench/data_sharing.json

With `--file`, the same on the user's own data: a CSV of `--rows` rows (default 1,000,000; a
question and a reply, a string label), generated when the file does not exist. Variants are
`cold` (empty `datasets` and tokenisation caches: read, check, tokenise, share) and `warm` (the
caches of the cold run, what every later search on the same file does); each reports the load
time (read and check: `load_own_data`), the whole preparation and the driver's peak memory.

    python scripts/bench_data_sharing.py --file /tmp/rows.csv --output docs/bench/data_file.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("arrow", "python")
FILE_VARIANTS = ("cold", "warm")
WORDS = ("the", "a", "my", "order", "password", "reset", "refund", "box", "late", "when",
         "where", "how", "why", "we", "you", "help", "thanks", "sorry", "click", "page",
         "account", "card", "shipped", "today", "week")  # fmt: skip
FILE_SETTINGS = {"text_columns": ["question", "reply"], "label_column": "outcome"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="sst2", help="GLUE task, shared whole")
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("SORA_TUNE_DATA_DIR") or str(REPO.parent / "shared/data/glue"),
        help="GLUE folder (default $SORA_TUNE_DATA_DIR or ../shared/data/glue)",
    )
    parser.add_argument(
        "--cache-dir", default=None, help="tokenisation cache (default the trials')"
    )
    parser.add_argument(
        "--file", help="measure own data: this CSV (written with --rows rows if it is missing)"
    )
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of a generated --file")
    parser.add_argument("--output", default="bench_data_sharing.json", help="the JSON written")
    parser.add_argument(  # one child's
        "--variant", choices=VARIANTS + FILE_VARIANTS, help=argparse.SUPPRESS
    )
    return parser.parse_args(argv)


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def write_rows(path: Path, rows: int, seed: int = 0) -> None:
    """A CSV of `rows` support exchanges, written in Arrow (not by this benchmark's driver)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pv

    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    outcome = rng.integers(0, 3, rows)

    def sentences(n_words: int) -> pa.Array:
        picked = words[rng.integers(0, len(words), (rows, n_words))]
        return pa.array([" ".join(r) for r in picked.tolist()])  # the generator only

    table = pa.table(
        {
            "question": sentences(8),
            "reply": sentences(12),
            "outcome": np.array(["answered", "escalated", "unanswered"])[outcome],
        }
    )
    pv.write_csv(table, path)


def measure_file(args: argparse.Namespace) -> dict:
    """In this (fresh) process: read and check the file, split, tokenise, share."""
    import ray

    from sora_tune.config import TrialConfig
    from sora_tune.data import load_own_data
    from sora_tune.models import load_tokenizer
    from sora_tune.train import own_data_location, prepare_data
    from sora_tune.tune.search import in_memory

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    start_mib = _peak_mib()
    config = TrialConfig(train_file=args.file, cache_dir=args.cache_dir, **FILE_SETTINGS)
    started = time.perf_counter()
    own = load_own_data(
        own_data_location(config), text_columns=config.text_fields, label_column="outcome"
    )
    load_s = time.perf_counter() - started
    loaded_mib = _peak_mib()
    data = prepare_data(config, load_tokenizer(config))  # reads the file again, from the cache
    prepare_s = time.perf_counter() - started
    reference = ray.put(in_memory(data))
    total_s = time.perf_counter() - started
    peak_mib = _peak_mib()
    del reference
    ray.shutdown()
    return {
        "variant": args.variant,
        "file_rows": len(own.raw["train"]),
        "file_mib": os.path.getsize(args.file) / 2**20,
        "rows": {name: len(split) for name, split in data.items()},
        "after_ray_init_mib": start_mib,
        "after_load_mib": loaded_mib,
        "peak_mib": peak_mib,
        "load_s": load_s,
        "prepare_s": prepare_s,
        "total_s": total_s,
    }


def main_file(argv: list[str], args: argparse.Namespace) -> dict:
    """Cold, then warm: each in a fresh process, so that each peak is its own."""
    import tempfile

    if not Path(args.file).exists():
        write_rows(Path(args.file), args.rows)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-data-file-") as caches:
        env = os.environ | {"HF_DATASETS_CACHE": f"{caches}/datasets"}
        extra = [] if args.cache_dir else ["--cache-dir", f"{caches}/tokenized"]
        for variant in FILE_VARIANTS:
            child = subprocess.run(
                [sys.executable, __file__, *argv, *extra, "--variant", variant],
                capture_output=True,
                text=True,
                env=env,
            )
            if child.returncode:
                sys.exit(f"the {variant} run failed:\n{child.stderr[-3000:]}")
            results[variant] = json.loads(child.stdout.strip().splitlines()[-1])
    result = {
        "benchmark": "data_file",
        "command": "python scripts/bench_data_sharing.py " + " ".join(argv),
        "config": {"file_rows": results["cold"]["file_rows"], **FILE_SETTINGS},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "results": results,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(f"{'variant':<8}{'rows':>10}{'load s':>8}{'prepare s':>11}{'total s':>9}{'peak MiB':>10}")
    for variant, r in results.items():
        print(
            f"{variant:<8}{r['file_rows']:>10}{r['load_s']:>8.1f}{r['prepare_s']:>11.1f}"
            f"{r['total_s']:>9.1f}{r['peak_mib']:>10.0f}"
        )
    return result


def measure(args: argparse.Namespace) -> dict:
    """In this (fresh) process: tokenise (from the cache), convert, put in the object store."""
    import ray
    from datasets import Dataset, DatasetDict

    from sora_tune.config import TrialConfig
    from sora_tune.models import load_tokenizer
    from sora_tune.train import prepare_data
    from sora_tune.tune.search import in_memory

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    start_mib = _peak_mib()
    config = TrialConfig(task=args.task, data_dir=args.data_dir, cache_dir=args.cache_dir)
    data = prepare_data(config, load_tokenizer(config))
    prepared_mib = _peak_mib()
    started = time.perf_counter()
    if args.variant == "arrow":
        shared = in_memory(data)
    else:
        shared = DatasetDict(
            {n: Dataset.from_dict(s.to_dict(), features=s.features) for n, s in data.items()}
        )
    reference = ray.put(shared)
    seconds = time.perf_counter() - started
    peak_mib = _peak_mib()
    rows = {name: len(split) for name, split in shared.items()}
    del reference
    ray.shutdown()
    return {
        "variant": args.variant,
        "rows": rows,
        "after_ray_init_mib": start_mib,
        "after_prepare_mib": prepared_mib,
        "peak_mib": peak_mib,
        "share_s": seconds,
    }


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.variant:
        print(json.dumps(measure_file(args) if args.file else measure(args)))
        return {}
    if args.file:
        return main_file(argv, args)
    # Warm the tokenisation cache first, so both variants read the same cached splits.
    subprocess.run(
        [sys.executable, __file__, *argv, "--variant", "arrow"], check=True, capture_output=True
    )
    results = {}
    for variant in VARIANTS:
        child = subprocess.run(
            [sys.executable, __file__, *argv, "--variant", variant],
            check=True,
            capture_output=True,
            text=True,
        )
        results[variant] = json.loads(child.stdout.strip().splitlines()[-1])
    result = {
        "benchmark": "data_sharing",
        "command": "python scripts/bench_data_sharing.py " + " ".join(argv),
        "config": {"task": args.task},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "results": results,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(
        f"{'variant':<8}{'rows (train)':>14}{'after prepare MiB':>19}{'peak MiB':>10}{'share s':>9}"
    )
    for variant, r in results.items():
        print(
            f"{variant:<8}{r['rows']['train']:>14}{r['after_prepare_mib']:>19.0f}"
            f"{r['peak_mib']:>10.0f}{r['share_s']:>9.1f}"
        )
    return result


if __name__ == "__main__":
    main()
