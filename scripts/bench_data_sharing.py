"""Peak memory of the search's driver while it shares a task's tokenised data with the trials.

The search tokenises once and puts the splits into Ray's object store (`tune.with_parameters`).
This measures the driver's peak resident memory (ru_maxrss) from start to the object store, in a
fresh process per variant, on a whole GLUE task (SST-2: 67k training rows):

- `arrow`: what the search does, `sora_tune.tune.search.in_memory`: each split's rows taken into
  an in-memory Arrow table;
- `python`: what it did before, every split turned into Python lists (`to_dict`) and back.

    python scripts/bench_data_sharing.py --task sst2 --output docs/bench/data_sharing.json
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
    parser.add_argument("--output", default="bench_data_sharing.json", help="the JSON written")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one child's
    return parser.parse_args(argv)


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(args: argparse.Namespace) -> dict:
    """In this (fresh) process: tokenise (from the cache), convert, put in the object store."""
    import ray
    from datasets import Dataset, DatasetDict

    from sora_tune.config import TrialConfig
    from sora_tune.train import load_tokenizer, prepare_data
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
        print(json.dumps(measure(args)))
        return {}
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
