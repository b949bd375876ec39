"""Share of padded token slots per GLUE task: the project's batching vs padding to max_length.

For every task, the training split (as a trial makes it: `make_splits`, then `tokenize_splits` at
`--max-length`) is batched three ways at each batch size: shuffled with dynamic padding (the trial
default), shuffled with `--group-by-length`, and every row padded to `max_length`. The share of
padding is `sora_tune.data.padding_ratio` over one epoch. Prints a table and writes JSON.

    python scripts/bench_padding.py --batch-sizes 8,32 --max-length 128 --output docs/bench/padding.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from transformers import AutoTokenizer  # noqa: E402

from sora_tune.config import default_model  # noqa: E402
from sora_tune.data import load_glue, make_splits, padding_ratio, tokenize_splits  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# The batching schemes compared, as keyword arguments of `padding_ratio` (pad_to filled in later).
SCHEMES = {
    "dynamic": {"shuffle": True},
    "group_by_length": {"shuffle": True, "group_by_length": True},
    "pad_to_max": {"shuffle": True, "pad_to": None},
}


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tasks", default="cola,sst2,mrpc,stsb", help="comma-separated GLUE task names"
    )
    parser.add_argument(
        "--data-dir",
        default=str(REPO.parent / "shared" / "data" / "glue"),
        help="folder in the official GLUE layout (<dir>/<TASK>/train.tsv)",
    )
    parser.add_argument(
        "--batch-sizes",
        type=_int_list,
        default=[8, 32],
        help="comma-separated rows per batch (8 is the trial default)",
    )
    parser.add_argument(
        "--max-length", type=int, default=128, help="truncation length in tokens (trial default)"
    )
    parser.add_argument("--model", default=default_model(), help="backbone whose tokenizer is used")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the shuffle")
    parser.add_argument(
        "--cache-dir", default=None, help="tokenisation cache; default that of the trials"
    )
    parser.add_argument("--output", default="bench_padding.json", help="where to write the JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tasks = [t for t in args.tasks.split(",") if t]
    results: dict[str, dict] = {}
    start = time.perf_counter()
    for task in tasks:
        splits = make_splits(load_glue(task, args.data_dir), task, seed=args.seed)
        train = tokenize_splits(
            splits, task, tokenizer, max_length=args.max_length, cache_dir=args.cache_dir
        )["train"]
        ratios = {}
        for batch_size in args.batch_sizes:
            ratios[str(batch_size)] = {
                name: padding_ratio(
                    train,
                    batch_size,
                    seed=args.seed,
                    **(kwargs | ({"pad_to": args.max_length} if "pad_to" in kwargs else {})),
                )
                for name, kwargs in SCHEMES.items()
            }
        results[task] = {"train_rows": len(train), "padding_ratio": ratios}

    result = {
        "benchmark": "padding",
        "command": "python scripts/bench_padding.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "config": vars(args),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "elapsed_s": time.perf_counter() - start,
        "results": results,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump(result, handle, indent=2)

    print(f"share of padded token slots, max_length {args.max_length}, train split")
    print(f"{'task':<7}{'rows':>7}{'batch':>7}{'dynamic':>10}{'grouped':>10}{'pad-to-max':>12}")
    for task, entry in results.items():
        for batch_size, r in entry["padding_ratio"].items():
            print(
                f"{task:<7}{entry['train_rows']:>7}{batch_size:>7}{r['dynamic']:>10.1%}"
                f"{r['group_by_length']:>10.1%}{r['pad_to_max']:>12.1%}"
            )
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
