"""Which modules get an adapter and which are trained in full, read from the model's structure.

- The **blocks** are the repeated transformer layers: every outermost `nn.ModuleList` whose items
  each hold linear layers (BERT's `encoder.layer`, Llama's `model.layers`, GPT-2's
  `transformer.h`; an encoder-decoder has two, and a hybrid stack may mix layer classes).
  Embeddings, poolers and heads sit outside them, whatever a family calls them.
- The **heads** are what a task model adds to its backbone (`model.base_model`): each of its other
  top-level modules with weights (`classifier`, `score`, DistilBERT's `pre_classifier`,
  ModernBERT's `head`, DeBERTa's `pooler`), and the backbone's own `pooler` (BERT's).
- The **presets** of the paper's Table 3 name attention projections by role. A role is read from
  the module's last name (`ROLE_NAMES`), and only inside an attention module (a class whose name
  contains "Attention"), so GPT-2's `attn.c_proj` is `o` and its `mlp.c_proj` is not.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import PRESETS

# GPT-2's (and OpenAI-GPT's) linear layer, with a transposed weight (in × out); SoRALinear takes both,
# and the quantised linears of bitsandbytes and torchao, which are `nn.Linear`s too (`base_kind`).
LINEAR_TYPES = (nn.Linear, Conv1D)

# Attention projections by role, as the families name them. `qkv` is one fused layer for all three
# (ModernBERT's `Wqkv`, GPT-2's `c_attn`, Phi-3's `qkv_proj`, GPT-NeoX's `query_key_value`).
ROLE_NAMES = {
    "q": ("query", "query_proj", "q_proj", "q_lin", "q"),
    "k": ("key", "key_proj", "k_proj", "k_lin", "k"),
    "v": ("value", "value_proj", "v_proj", "v_lin", "v"),
    "o": ("dense", "o_proj", "out_proj", "out_lin", "c_proj", "Wo", "o"),
    "qkv": ("Wqkv", "c_attn", "qkv_proj", "query_key_value", "qkv"),
}
PRESET_ROLES = {"attention": ("q", "k", "v", "o"), "qkv": ("q", "k", "v"), "qk": ("q", "k")}


def inside(name: str, prefixes: Iterable[str]) -> bool:
    """Whether module `name` is one of `prefixes` or inside one."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def transformer_blocks(model: nn.Module) -> list[str]:
    """The names of the model's block lists: outermost `nn.ModuleList`s whose items are modules
    that hold linear layers (not a list of bare linear layers)."""
    found: list[str] = []
    for name, module in model.named_modules():  # parents come before their children
        if not isinstance(module, nn.ModuleList) or len(module) == 0 or inside(name, found):
            continue
        if all(
            not isinstance(item, LINEAR_TYPES)
            and any(isinstance(m, LINEAR_TYPES) for m in item.modules())
            for item in module
        ):
            found.append(name)
    return found


def task_heads(model: nn.Module) -> list[str]:
    """The modules a task model adds to its backbone, and the backbone's pooler (see the module
    docstring): trained in full, saved beside the adapter. Empty for a bare backbone."""
    backbone = getattr(model, "base_model", model)  # a bare backbone is its own base model
    heads = [
        name
        for name, child in model.named_children()
        if backbone is not model
        and child is not backbone
        and next(child.parameters(), None) is not None
    ]
    prefix = next((f"{n}." for n, c in model.named_children() if c is backbone), "")
    pooler = getattr(backbone, "pooler", None)
    if isinstance(pooler, nn.Module) and next(pooler.parameters(), None) is not None:
        heads.append(prefix + "pooler")
    return heads


def linear_layers(model: nn.Module) -> list[str]:
    """Every linear layer an adapter can wrap. Not the output projection of a `torch.nn`
    `MultiheadAttention`, which reads that layer's weight itself instead of calling it."""
    modules = dict(model.named_modules())
    return [
        name
        for name, module in modules.items()
        if isinstance(module, LINEAR_TYPES)
        and not isinstance(modules.get(name.rpartition(".")[0]), nn.MultiheadAttention)
    ]


def block_linears(model: nn.Module) -> list[str]:
    """The linear layers inside the transformer blocks: the default targets (`all`)."""
    blocks = transformer_blocks(model)
    return [name for name in linear_layers(model) if inside(name, blocks)]


def attention_roles(model: nn.Module) -> dict[str, str]:
    """`{module_name: role}` for the block linears that are attention projections (`ROLE_NAMES`)."""
    modules = dict(model.named_modules())
    by_name = {n: role for role, names in ROLE_NAMES.items() for n in names}
    roles = {}
    for name in block_linears(model):
        parts = name.split(".")
        ancestors = (".".join(parts[:i]) for i in range(1, len(parts)))
        if parts[-1] in by_name and any(
            "Attention" in type(modules[a]).__name__ for a in ancestors
        ):
            roles[name] = by_name[parts[-1]]
    return roles


def preset_targets(model: nn.Module, preset: str) -> list[str]:
    """The block linears a preset names (`all`, `attention`, `qkv`, `qk`), in the model's order.

    A fused q/k/v layer is adapted whole by `attention` and `qkv`: its update is one low-rank
    matrix over all three, as PEFT does.

    Raises:
        ValueError: a role of the preset is not found in the blocks, or `qk` on a fused q/k/v
            layer, which cannot be adapted for q and k without v.
    """
    if preset == "all":
        return block_linears(model)
    roles = attention_roles(model)
    fused = [name for name, role in roles.items() if role == "qkv"]
    kind = type(model).__name__
    if fused and preset == "qk":
        raise ValueError(
            f"target_modules='qk': {kind} computes q, k and v in one fused layer ({fused[0]}), "
            "which cannot be adapted for q and k alone; use 'qkv' or 'attention'"
        )
    wanted = set(PRESET_ROLES[preset]) | ({"qkv"} if fused else set())
    found = set(roles.values()) | ({"q", "k", "v"} if fused else set())
    missing = [role for role in PRESET_ROLES[preset] if role not in found]
    if missing:
        raise ValueError(
            f"target_modules={preset!r}: no {missing[0]} projection found in the blocks of {kind} "
            f"(its block linears include {block_linears(model)[:6]}); give their names or a regex"
        )
    return [name for name, role in roles.items() if role in wanted]


def resolve_targets(
    model: nn.Module, target_modules: str | list[str], exclude: Iterable[str] = ()
) -> list[str]:
    """The names of the linear layers `target_modules` selects: a preset (`PRESETS`), a regular
    expression matching a module's full name (PEFT's convention), or a list of names that match
    a module's name or its ending after a dot. Modules under `exclude` (the heads) never are.

    Raises:
        ValueError: nothing matches, or a preset does not fit the model (`preset_targets`).
    """
    exclude = list(exclude)
    if isinstance(target_modules, str) and target_modules in PRESETS:
        names = preset_targets(model, target_modules)
    elif isinstance(target_modules, str):
        names = [n for n in linear_layers(model) if re.fullmatch(target_modules, n)]
    else:
        names = [
            n
            for n in linear_layers(model)
            if any(n == t or n.endswith("." + t) for t in target_modules)
        ]
    names = [n for n in names if not inside(n, exclude)]
    if not names:
        raise ValueError(
            f"target_modules={target_modules!r} matches no linear layer; "
            f"the model's linear layers include {linear_layers(model)[:6]}"
        )
    return names
