"""Milliseconds per inference batch: bare base model vs a pruned SoRA adapter, merged and not.

Four variants of the same backbone and head, timed interleaved in one process (separate processes
vary by up to 60% here), in eval mode under `torch.no_grad()`:

- `base`: the bare model, no adapter;
- `pruned_merged`: a SoRA adapter pruned (`prune`) and merged into the base weights
  (`set_merged(model, True)`); the target is the same latency as `base`;
- `pruned`: the pruned adapter, unmerged (rank r_k per module);
- `rmax`: the unpruned adapter at rank r_max, unmerged.

The adapter is made sparse deterministically: every module's `sora_B` is drawn from a seeded
generator (non-zero, so the adapter changes the logits) and a seeded `--sparsity` share of its gates
is set to zero, so pruning has work to do. Prints a table and writes JSON.

    python scripts/bench_inference.py --rounds 8 --steps 2 --output docs/bench/inference.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification  # noqa: E402

from sora_tune.config import default_model  # noqa: E402
from sora_tune.sora import SoRAConfig, add_sora, prune, set_merged, sora_layers  # noqa: E402

VARIANTS = ("base", "pruned_merged", "pruned", "rmax")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds per variant")
    parser.add_argument("--steps", type=int, default=2, help="timed batches per variant per round")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per batch")
    parser.add_argument("--length", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--r-max", type=int, default=8, help="adapter rank before pruning")
    parser.add_argument(
        "--sparsity", type=float, default=0.5, help="share of each module's gates set to zero"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the adapter and the batch")
    parser.add_argument("--model", default=default_model(), help="backbone name or folder")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads; default torch's choice"
    )
    parser.add_argument("--output", default="bench_inference.json", help="where to write the JSON")
    return parser.parse_args(argv)


def build(variant: str, args: argparse.Namespace) -> tuple[torch.nn.Module, dict[str, int] | None]:
    """One variant, in eval mode; the same base weights, head and adapter for all of them."""
    torch.manual_seed(args.seed)  # the freshly initialised head is the same in every variant
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    if variant == "base":
        return model.eval(), None
    add_sora(model, SoRAConfig(r_max=args.r_max, alpha=args.r_max))
    generator = torch.Generator().manual_seed(args.seed)
    n_zero = round(args.sparsity * args.r_max)
    with torch.no_grad():
        for layer in sora_layers(model).values():  # a fixed module order: the same draws each time
            layer.sora_B.copy_(0.02 * torch.randn(layer.sora_B.shape, generator=generator))
            zeroed = torch.randperm(args.r_max, generator=generator)[:n_zero]
            layer.sora_gate[zeroed] = 0.0
    ranks = None
    if variant != "rmax":
        ranks = prune(model)
    if variant == "pruned_merged":
        set_merged(model, True)
    return model.eval(), ranks


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    built = {v: build(v, args) for v in VARIANTS}
    models = {v: m for v, (m, _) in built.items()}
    ranks = built["pruned"][1]
    generator = torch.Generator().manual_seed(args.seed)
    vocab = models["base"].config.vocab_size
    batch = {
        "input_ids": torch.randint(
            min(1000, vocab - 1), vocab, (args.batch_size, args.length), generator=generator
        ),
        "attention_mask": torch.ones(args.batch_size, args.length, dtype=torch.long),
    }

    with torch.no_grad():
        logits = {v: m(**batch).logits for v, m in models.items()}  # also the warm-up
        times_ms: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for _ in range(args.rounds):
            for variant in VARIANTS:
                for _ in range(args.steps):
                    start = time.perf_counter()
                    models[variant](**batch)
                    times_ms[variant].append((time.perf_counter() - start) * 1000)

    medians = {v: statistics.median(t) for v, t in times_ms.items()}
    # Pruning and merging must not change what the adapter computes.
    max_abs_diff = {
        v: float((logits[v] - logits["rmax"]).abs().max()) for v in ("pruned", "pruned_merged")
    }
    result = {
        "benchmark": "inference",
        "command": "python scripts/bench_inference.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "config": vars(args) | {"torch_threads": torch.get_num_threads()},
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "device": "cpu",
            "note": "another job may share the CPU",
        },
        "adapter": {
            "modules": len(ranks),
            "rank_sum_rmax": args.r_max * len(ranks),
            "rank_sum_pruned": sum(ranks.values()),
        },
        "median_ms": medians,
        "ratios": {
            "pruned_merged_over_base": medians["pruned_merged"] / medians["base"],
            "pruned_over_base": medians["pruned"] / medians["base"],
            "rmax_over_base": medians["rmax"] / medians["base"],
            "pruned_over_rmax": medians["pruned"] / medians["rmax"],
        },
        "logits_max_abs_diff_vs_rmax": max_abs_diff,
        "samples_ms": times_ms,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump(result, handle, indent=2)

    print(
        f"batch {args.batch_size} x {args.length} tokens, {torch.get_num_threads()} threads, "
        f"{args.rounds} rounds x {args.steps} (another job may share the CPU)"
    )
    print(f"{'variant':<15}{'median ms':>11}{'min':>10}{'max':>10}{'/ base':>9}")
    for variant in VARIANTS:
        t = times_ms[variant]
        print(
            f"{variant:<15}{medians[variant]:>11.1f}{min(t):>10.1f}{max(t):>10.1f}"
            f"{medians[variant] / medians['base']:>9.3f}"
        )
    print(f"pruned / rmax = {result['ratios']['pruned_over_rmax']:.3f}")
    print(f"logits max |diff| vs rmax: {max_abs_diff}")
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
