"""The memory estimate beside the measured peak of one training step on this CPU, for each model
given, at each base_dtype, with and without gradient checkpointing (`sora_tune.peak_memory`):

    python scripts/check_memory_estimate.py --model ./bert-256 --model ./llama-256 \
        [--base-dtypes fp32,bf16,int8,nf4] [--batch-size 8] [--max-length 128] [--output a.json]

Prints a table (estimate, measured, their ratio, and the measured peak split into the model's
own bytes and what the step added) and writes it as JSON with --output. Linux only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from sora_tune.config import TrialConfig
from sora_tune.peak_memory import check_estimates

MIB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="a model folder")
    parser.add_argument("--base-dtypes", default="fp32,bf16,int8,nf4", help="comma-separated")
    parser.add_argument("--batch-size", type=int, default=8, help="rows a step (default: 8)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens a row (default: 128)")
    parser.add_argument("--r-max", type=int, default=8, help="SoRA's rank (default: 8)")
    parser.add_argument("--output", help="write the rows as JSON here")
    args = parser.parse_args()
    configs = [
        TrialConfig(
            model=model,
            base_dtype=base_dtype,
            gradient_checkpointing=checkpointing,
            batch_size=args.batch_size,
            max_length=args.max_length,
            r_max=args.r_max,
        )
        for model in args.model
        for base_dtype in args.base_dtypes.split(",")
        for checkpointing in (False, True)
    ]
    rows = []
    print(
        f"{'model':<24}{'base':>6}{'ckpt':>6}{'estimate':>10}{'measured':>10}{'ratio':>7}"
        f"{'model':>9}{'step':>9}  (MiB)"
    )
    for check in check_estimates(configs):
        config, measured = check.config, check.measured
        row = {
            "model": config.model,
            "base_dtype": config.base_dtype,
            "gradient_checkpointing": config.gradient_checkpointing,
            "estimated_bytes": check.estimated_bytes,
            "ratio": check.ratio,
            **dataclasses.asdict(measured),
            "peak_bytes": measured.peak_bytes,
        }
        rows.append(row)
        print(
            f"{config.model[-24:]:<24}{config.base_dtype:>6}"
            f"{'yes' if config.gradient_checkpointing else 'no':>6}"
            f"{check.estimated_bytes / MIB:>10.1f}{measured.peak_bytes / MIB:>10.1f}"
            f"{check.ratio:>7.3f}{measured.model_bytes / MIB:>9.1f}{measured.step_bytes / MIB:>9.1f}"
        )
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
