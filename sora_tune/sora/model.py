"""Putting SoRA into a Hugging Face model and taking it out again: injection, optimizer groups,
pruning, parameter counts, and adapter files (our safetensors checkpoint and PEFT's LoRA format)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig
from peft.tuners.adalora import SVDLinear
from safetensors.torch import load_file, save_file
from torch import nn

from .config import SoRAConfig
from .layer import ADAPTER_DTYPE, PREFIX, SoRALinear
from .targets import resolve_targets, task_heads

PEFT_PREFIX = "base_model.model."  # PEFT's key prefix for a model wrapped in PeftModel


def sora_layers(model: nn.Module) -> dict[str, SoRALinear]:
    """Every SoRA layer of the model, by full module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SoRALinear)}


def resolve_heads(model: nn.Module, config: SoRAConfig) -> list[str]:
    """The modules trained in full: `config.modules_to_save`, or the default head.

    Raises:
        ValueError: a named module does not exist.
    """
    names = dict(model.named_modules())
    if config.modules_to_save is not None:
        missing = [h for h in config.modules_to_save if h not in names]
        if missing:
            raise ValueError(f"modules_to_save names modules the model does not have: {missing}")
        return list(config.modules_to_save)
    return task_heads(model)


def add_sora(model: nn.Module, config: SoRAConfig) -> nn.Module:
    """Freeze the model, wrap every targeted linear layer in a `SoRALinear`, unfreeze the head.

    Works in place and returns the model. The resolved config (with `modules_to_save` filled in) is
    kept as `model.sora_config`.

    Raises:
        RuntimeError: the model already has SoRA layers.
        ValueError: `target_modules` selects no linear layer or does not fit the model (see
            `targets.resolve_targets`), or a head is not found.
    """
    if sora_layers(model):
        raise RuntimeError("the model already has SoRA layers")
    heads = resolve_heads(model, config)
    targets = resolve_targets(model, config.target_modules, exclude=heads)
    model.requires_grad_(False)
    for name in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = SoRALinear(
            getattr(parent, child_name),
            r_max=config.r_max,
            alpha=config.alpha,
            dropout=config.dropout,
            gate_init=config.gate_init,
            trainable_gate=config.trainable_gate,
        )
        setattr(parent, child_name, layer)
    for head in heads:
        keep_in_fp32(model.get_submodule(head)).requires_grad_(True)
    model.sora_config = dataclasses.replace(config, modules_to_save=heads)
    return model


def keep_in_fp32(module: nn.Module) -> nn.Module:
    """Keep a module trained in full (a head) in fp32 like the adapter, whatever the base's
    dtype: its weights cast up, and its floating inputs too as they come in (a bf16 base hands
    it bf16 hidden states). Its outputs stay fp32: a head's go to another head or the loss.
    Returns the module."""
    module.to(ADAPTER_DTYPE)
    module.register_forward_pre_hook(_inputs_to_fp32, with_kwargs=True)
    return module


def _inputs_to_fp32(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    def cast(value):
        floating = isinstance(value, torch.Tensor) and value.is_floating_point()
        return value.to(ADAPTER_DTYPE) if floating else value

    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


def param_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The trainable parameters by optimizer: `adapter` (W_d, W_u) and `head` go to AdamW,
    `gate` to the proximal gate optimizer."""
    groups: dict[str, list[nn.Parameter]] = {"adapter": [], "gate": [], "head": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith(PREFIX + "gate"):
            groups["gate"].append(p)
        elif PREFIX in name:
            groups["adapter"].append(p)
        else:
            groups["head"].append(p)
    return groups


def module_ranks(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """`{module_name: (rank, in_features, out_features)}` for every adapted module. The rank is what
    pruning keeps: SoRA's non-zero gates, or the non-zero singular values of a PEFT AdaLoRA layer."""
    ranks = {
        name: (int(torch.count_nonzero(m.sora_gate)), m.in_features, m.out_features)
        for name, m in sora_layers(model).items()
    }
    for name, m in model.named_modules():
        if isinstance(m, SVDLinear):
            rank = int(torch.count_nonzero(m.lora_E[m.active_adapters[0]]))
            ranks[name.removeprefix(PEFT_PREFIX)] = (rank, m.in_features, m.out_features)
    return ranks


def rank_pattern(model: nn.Module) -> dict[str, int]:
    """The rank each adapted module keeps (see `module_ranks`)."""
    return {name: rank for name, (rank, _, _) in module_ranks(model).items()}


def retained_params(model: nn.Module) -> int:
    """Σ_k r_k · (in_k + out_k) over adapted modules, r_k the rank kept by pruning (`module_ranks`).
    Gates fold away and the head is counted apart (`head_params`)."""
    return sum(rank * (n_in + n_out) for rank, n_in, n_out in module_ranks(model).values())


def head_params(model: nn.Module) -> int:
    """Parameters trained in full beside the adapter (the task head, PEFT's `modules_to_save`)."""
    return sum(
        p.numel()
        for name, p in model.named_parameters()
        if p.requires_grad and PREFIX not in name and "lora_" not in name
    )


def prune(model: nn.Module) -> dict[str, int]:
    """Prune every SoRA layer in place (see `SoRALinear.prune_`); rank-0 layers become the plain
    frozen linear again. Returns the rank pattern `{module_name: rank}`, zeros included."""
    pattern = {}
    for name, layer in sora_layers(model).items():
        pattern[name] = layer.prune_()
        if pattern[name] == 0:
            parent_name, _, child_name = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child_name, layer.base_layer)
    return pattern


@contextmanager
def gates_thresholded(model: nn.Module, tau: float) -> Iterator[None]:
    """Inside the block, every SoRA gate entry with |g| ≤ `tau` is zero and the others are as they
    were (a hard threshold, no shrinking): the adapter a post-hoc threshold leaves, to be scored
    and counted (`retained_params`) without training. The gates are restored on leaving."""
    layers = list(sora_layers(model).values())
    saved = [layer.sora_gate.detach().clone() for layer in layers]
    try:
        with torch.no_grad():
            for layer in layers:
                layer.sora_gate.masked_fill_(layer.sora_gate.abs() <= tau, 0.0)
        yield
    finally:
        with torch.no_grad():
            for layer, gate in zip(layers, saved, strict=True):
                layer.sora_gate.copy_(gate)


def gate_quantiles(model: nn.Module, quantiles: Sequence[float]) -> list[float]:
    """The `quantiles` of the non-zero |g| over every SoRA gate of `model`: the thresholds that
    zero about those shares of the ranks it keeps (`gates_thresholded`). Empty when every rank
    is pruned already, so no threshold can take more."""
    gates = torch.cat([layer.sora_gate.detach().abs() for layer in sora_layers(model).values()])
    kept = gates[gates > 0].float()
    if not len(kept):
        return []
    return [torch.quantile(kept, q).item() for q in quantiles]


def set_merged(model: nn.Module, merged: bool) -> None:
    """Merge every SoRA layer into its base weight (`True`) or take it out again (`False`)."""
    for layer in sora_layers(model).values():
        if layer.merged != merged:
            layer.merge() if merged else layer.unmerge()


def adapter_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter that training changes, by name: the trainable ones (adapter and head,
    whatever the method) and the `sora_` ones (so a LoRA baseline's frozen gate is kept too)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad or PREFIX in name}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of `adapter_params`: what the adapter's files hold."""
    return {name: p.detach().contiguous() for name, p in adapter_params(model).items()}


def save_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Write `adapter_state_dict` as safetensors, with the SoRA config (if any) in the metadata."""
    config = getattr(model, "sora_config", None)
    metadata = {"sora_config": json.dumps(config.to_dict())} if config is not None else None
    save_file(adapter_state_dict(model), str(path), metadata=metadata)


def load_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Load tensors written by `save_adapter` into a model with the same adapter layout.

    Raises:
        ValueError: the file's tensors do not match the model's adapter (names or shapes).
    """
    saved = load_file(str(path))
    current = adapter_state_dict(model)
    if saved.keys() != current.keys():
        missing, unexpected = current.keys() - saved.keys(), saved.keys() - current.keys()
        raise ValueError(
            f"{path}: adapter does not match the model (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})"
        )
    bad = [n for n, t in saved.items() if t.shape != current[n].shape]
    if bad:
        raise ValueError(f"{path}: shape mismatch for {bad[:3]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor)


def export_peft(model: nn.Module, folder: str | os.PathLike) -> dict[str, int]:
    """Write the pruned adapter as a stock PEFT LoRA folder (`adapter_config.json` and
    `adapter_model.safetensors`) that `peft.PeftModel.from_pretrained(base, folder)` loads.

    The model need not be pruned first: each module's `lora_factors` are exported, with its own rank
    (`rank_pattern`) and alpha = rank so PEFT's scaling is 1 (s · diag(g) is folded into B).
    Rank-0 modules are left out; the head goes to `modules_to_save`. Files are written beside the
    folder first and moved in, so an existing export is never left half-overwritten. Returns the
    exported rank pattern.

    Raises:
        RuntimeError: every gate is zero, so there is no LoRA module to export.
    """
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name, layer in sora_layers(model).items():
        lora_A, lora_B = layer.lora_factors()
        if lora_A.shape[0] == 0:
            continue
        ranks[name] = lora_A.shape[0]
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = lora_A.contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = lora_B.contiguous()
    if not ranks:
        raise RuntimeError("every gate is zero: the pruned adapter is empty, nothing to export")
    heads = model.sora_config.modules_to_save
    for head in heads:
        for pname, p in model.get_submodule(head).named_parameters():
            tensors[f"{PEFT_PREFIX}{head}.{pname}"] = p.detach().contiguous()
    # Exact full-name keys: PEFT matches pattern keys as regexes against module names.
    patterns = {re.escape(name): rank for name, rank in ranks.items()}
    peft_config = LoraConfig(
        task_type="SEQ_CLS",
        r=max(ranks.values()),
        lora_alpha=max(ranks.values()),
        target_modules=sorted(ranks),
        rank_pattern=patterns,
        alpha_pattern={key: float(rank) for key, rank in patterns.items()},
        modules_to_save=list(heads),
        lora_dropout=model.sora_config.dropout,
        # PEFT's flag for a transposed (in × out) base weight such as GPT-2's Conv1D
        fan_in_fan_out=any(sora_layers(model)[name].fan_in_fan_out for name in ranks),
        base_model_name_or_path=getattr(model, "name_or_path", None),
    )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}-") as staging:
        peft_config.save_pretrained(staging)
        save_file(
            tensors, os.path.join(staging, "adapter_model.safetensors"), metadata={"format": "pt"}
        )
        for file in ("adapter_config.json", "adapter_model.safetensors"):
            os.replace(os.path.join(staging, file), folder / file)
    return ranks
