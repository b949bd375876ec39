"""How many parameters SoRA trains and can retain on a decoder: counts, computed, not timed.

Each model is built from its published configuration on PyTorch's meta device (shapes only: no
weights, no download), SoRA is added with the default targets (every linear layer inside the
transformer blocks) and the counts are read off its layers:

- trainable: the adapters' W_d and W_u, their gates, and the `score` head (2 labels);
- retained at most: Σ r_max · (in + out), what pruning keeps when no gate reaches zero (the
  size of a plain LoRA of rank r_max on the same modules); pruning keeps less.

    python scripts/adapter_params.py --r-max 8
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForSequenceClassification

from sora_tune.sora import SoRAConfig, add_sora, head_params, sora_layers

# From each model's config.json on the Hugging Face Hub (HuggingFaceTB/SmolLM2-135M,
# meta-llama/Llama-3.2-1B, meta-llama/Llama-3.1-8B): all three are Llama architectures.
PUBLISHED = {
    "SmolLM2-135M": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "Llama-3.2-1B": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "Llama-3.1-8B": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
}


def adapter_counts(model: nn.Module, r_max: int = 8) -> dict[str, int]:
    """Add SoRA (default targets, `r_max`) to `model` in place and count its parameters."""
    backbone = sum(
        p.numel() for name, p in model.named_parameters() if name.split(".")[0] != "score"
    )
    add_sora(model, SoRAConfig(r_max=r_max))
    layers = sora_layers(model).values()
    adapter = sum(layer.rank * (layer.in_features + layer.out_features) for layer in layers)
    gates = sum(layer.rank for layer in layers)
    head = head_params(model)
    return {
        "backbone": backbone,
        "modules": len(layers),
        "trainable": adapter + gates + head,
        "head": head,
        "retained_max": adapter,
    }


def published_counts(name: str, r_max: int = 8) -> dict[str, int]:
    """`adapter_counts` of a `PUBLISHED` model, built on the meta device."""
    config = LlamaConfig(num_labels=2, pad_token_id=0, **PUBLISHED[name])
    with torch.device("meta"):
        model = LlamaForSequenceClassification(config)
    return adapter_counts(model, r_max)


def main(argv: list[str] | None = None) -> dict[str, dict[str, int]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--r-max", type=int, default=8, help="SoRA's rank before pruning")
    args = parser.parse_args(argv)
    table = {name: published_counts(name, args.r_max) for name in PUBLISHED}
    print("| decoder | backbone | adapted modules | trainable | retained at most |")
    print("|---|---:|---:|---:|---:|")
    for name, c in table.items():
        share = 100 * c["retained_max"] / c["backbone"]
        print(
            f"| {name} | {c['backbone'] / 1e6:,.1f}M | {c['modules']} | {c['trainable']:,} | "
            f"{c['retained_max']:,} ({share:.2f}%) |"
        )
    return table


if __name__ == "__main__":
    main()
