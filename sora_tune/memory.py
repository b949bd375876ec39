"""A trial's memory before anything runs (`estimate_memory`), from the model's configuration
alone: the task model is built on the meta device (shapes, no weights read) and the adapter's
targets are resolved as `add_sora` resolves them. The parts, each a row of `MemoryEstimate`:

- **frozen weights** at the trial's `base_dtype`: floats at their size; a quantised base's block
  linears in NF4 or LLM.int8 with their constants, the rest (embeddings, norms, biases) in the
  float dtype the base computes in;
- **adapter** and **head**: fp32 values, gradients and AdamW's two fp32 moments (16 bytes a
  parameter; PEFT's AdaLoRA keeps three more fp32 tensors a parameter for its rank allocator);
- **activations** of a training step at `batch_size` rows of `max_length` tokens (every row
  padded to the full length, the worst case), by layers, hidden size, intermediate size, heads
  and `gradient_checkpointing` (`activation_bytes`);
- on a GPU, the **CUDA context** and the caching allocator's **slack**;
- for one of a trial's data-parallel **workers** (`workers` > 1), its share of every batch and
  the **gradient all-reduce**'s copy of the trained gradients (`worker_all_reduce_bytes`).

The activation constants are fitted to, and the CPU parts checked against, training steps
measured on this CPU (`sora_tune.peak_memory`; tests/test_memory.py). The GPU parts are not
measured here. Nothing here loads torch until an estimate is asked for, so the CLI refuses bad
input first.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .config import TrialConfig

if TYPE_CHECKING:
    import torch

Device = Literal["cuda", "cpu"]

# Published decoders' shapes, from their config.json on the Hugging Face Hub: the README's "Big
# models" table and the GPU memory grid (scripts/bench_memory.py --shape) build them.
LLAMA_31_SHARED = dict(num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
PUBLISHED_SHAPES: dict[str, dict] = {
    "SmolLM2-135M": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
    ),
    "Llama-3.2-1B": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
    ),
    "Llama-3.1-8B": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        **LLAMA_31_SHARED,
    ),
    "Llama-3.1-70B": dict(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        **LLAMA_31_SHARED,
    ),
}  # fmt: skip

# The settings `estimate_memory` reads: trials that agree on them need the same memory.
MEMORY_FIELDS = (
    "model",
    "method",
    "r_max",
    "target_modules",
    "modules_to_save",
    "precision",
    "base_dtype",
    "batch_size",
    "max_length",
    "gradient_checkpointing",
)
# QLoRA's NF4 (Dettmers et al. 2023, §3): 4 bits a weight, and double quantisation's constants,
# an 8-bit absmax per block of 64 weights and an fp32 one per 256 of those blocks:
# 8/64 + 32/(64·256) = 0.127 bits a weight.
NF4_BYTES_PER_WEIGHT = (4 + 8 / 64 + 32 / (64 * 256)) / 8
# LLM.int8 (bitsandbytes' int8_vectorwise_quant): one byte a weight, one fp32 scale a row (SCB).
INT8_BYTES_PER_WEIGHT = 1
INT8_BYTES_PER_ROW = 4
# The parts of a GPU estimate that are not tensors.
GPU_OVERHEADS = ("CUDA context", "allocator slack")
# A trained parameter: its fp32 value and gradient, and AdamW's two fp32 moments.
TRAINED_BYTES = 4 + 4 + 2 * 4
# PEFT's AdaLoRA RankAllocator keeps ipt, exp_avg_ipt and exp_avg_unc, fp32, for every
# parameter of its adapters (peft/tuners/adalora/layer.py, update_ipt). Not measured here.
ADALORA_ALLOCATOR_BYTES = 3 * 4
FLOAT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

# Activations a block keeps for its backward pass, in elements a token, counted from the tensors
# autograd saved (saved_tensors_hooks) in training steps of BERT and Llama on this CPU, adapter on
# every block linear: HIDDEN_TERMS hidden sizes (a Llama block's input, its normed inputs,
# the rotated queries, the attention's output and its projection's input), KV_TERMS key/value
# widths (the rotated keys, the values) and INTERMEDIATE_TERMS intermediate sizes for each
# linear that outputs one (a gated MLP has two: its gate's output, SiLU's, up's and their
# product; BERT's one: GELU's input and output).
HIDDEN_TERMS = 6
KV_TERMS = 2
INTERMEDIATE_TERMS = 2
# Attention that keeps its probabilities (`_attention_probabilities_kept`; torch's math kernel)
# also keeps query and key scaled (two hidden sizes) and, per head, three tensors of a length a
# token: softmax's output, dropout's mask and dropout's output; all fp32, whatever the model
# computes in (counted as above, BERT in fp32 and bf16: the kernel upcasts 16-bit inputs).
MATH_ATTENTION_HIDDEN_TERMS = 2
MATH_ATTENTION_PROBABILITY_TERMS = 3
MATH_ATTENTION_BYTES = 4
# Outside the blocks, hidden sizes a token: the head's input (counted as above) and one more,
# fitted with BACKWARD_TERMS.
OUTSIDE_TERMS = 2
# The backward pass's gradients in flight at its peak, intermediate sizes a token: fitted to the
# measured steps' peaks beyond their saved tensors (7-8 MiB at 1,024 tokens of intermediate
# size 1,024, fp32).
BACKWARD_TERMS = 2
# With gradient checkpointing a block keeps only its input, one hidden size a token, and the
# backward pass recomputes one block at a time (transformers' gradient_checkpointing_enable).
CHECKPOINTED_TERMS = 1
# bitsandbytes' 8-bit matmul keeps its input as an attribute of its autograd context (`ctx.A`
# on the CPU, `ctx.tensors` on CUDA), out of the reach of checkpointing's saved-tensor hooks: with
# an int8 base and gradient checkpointing every block still keeps its linears' inputs (measured
# here: 24-26 MiB beyond the checkpointed steps of the other base dtypes, BERT and Llama).

# The CUDA context of a process that trains: PyTorch measured 274 MiB with CUDA's lazy module
# loading, its default since 1.13, and 636 MiB without (pytorch/pytorch#86509); cuBLAS's
# workspace and bitsandbytes' kernels come on top. A round figure above both; not measured here.
CUDA_CONTEXT_BYTES = 1 << 30
# What the caching allocator reserves beyond the live tensors (rounding and fragmentation):
# EleutherAI's "Transformer Math 101" allows up to 20% beyond the tensors' bytes, the allowance
# accelerate's memory estimator quotes. Not measured here.
ALLOCATOR_SLACK = 0.2

# Attention dropout as the configurations of the families name it.
ATTENTION_DROPOUT_NAMES = ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop")


@dataclass(frozen=True)
class MemoryPart:
    """One row of an estimate: what it is, its bytes, and how they were counted."""

    name: str
    bytes: int
    detail: str


@dataclass(frozen=True)
class MemoryEstimate:
    """The memory one training trial needs on `device`, part by part (`parts`).

    Args:
        parts: The rows, in the order printed.
        device: `cuda` or `cpu`.
        base_dtype: The trial's base_dtype on that device (`auto` resolved).
        precision: The trial's autocast precision on that device (`auto` resolved).
    """

    parts: tuple[MemoryPart, ...]
    device: str
    base_dtype: str
    precision: str

    @property
    def total_bytes(self) -> int:
        return sum(part.bytes for part in self.parts)

    @property
    def tensor_bytes(self) -> int:
        """The tensors' part: the total without the CUDA context and the allocator's slack,
        what `torch.cuda.max_memory_allocated` counts."""
        return sum(part.bytes for part in self.parts if part.name not in GPU_OVERHEADS)

    def trials_per_gpu(self, gpu_bytes: int) -> int:
        """How many such trials fit in `gpu_bytes` of one GPU, side by side (each its own
        process, context included)."""
        return gpu_bytes // self.total_bytes

    def to_dict(self, gpu_bytes: int | None = None) -> dict:
        """The estimate as plain data: `total_bytes`, the parts by name, and with `gpu_bytes`
        given, `gpu_bytes` and `trials_per_gpu`."""
        result = {
            "total_bytes": self.total_bytes,
            "device": self.device,
            "base_dtype": self.base_dtype,
            "precision": self.precision,
            "parts": [dataclasses.asdict(part) for part in self.parts],
        }
        if gpu_bytes is not None:
            result |= {"gpu_bytes": gpu_bytes, "trials_per_gpu": self.trials_per_gpu(gpu_bytes)}
        return result


UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
MEMORY_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]I?B|B)\s*", re.IGNORECASE)


def memory_size(text: str) -> int:
    """Bytes of a memory size written with its unit: `24GiB` (2**30), `80GB` (10**9), `512MiB`.

    Raises:
        ValueError: not a positive number followed by one of B, KB, MB, GB, TB, KiB, MiB, GiB,
            TiB.
    """
    match = MEMORY_SIZE.fullmatch(text)
    size = int(float(match[1]) * UNITS[match[2].upper()]) if match else 0
    if size <= 0:
        raise ValueError(
            f"--gpu-memory {text!r} is not a memory size: give a number and a unit, e.g. 24GiB "
            "or 80GB"
        )
    return size


def format_bytes(size: float) -> str:
    """`size` in GiB, MiB or KiB, whichever reads best."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(size) >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size:.0f} B"


def estimate_memory(
    config: TrialConfig, *, device: Device = "cuda", workers: int = 1
) -> MemoryEstimate:
    """The memory one trial of `config` needs on `device`, from the model's configuration alone;
    with `workers` > 1, what each process of a trial of that many data-parallel workers needs
    (`workers_per_trial`, see `worker_all_reduce_bytes`).

    On `cuda` without a GPU here, `auto` (base_dtype, precision) is bf16, as on a GPU that
    computes in it natively (Ampere and newer: every GPU of 24 GB or more a search would run
    on). The head is sized at the configuration's default number of labels.

    Raises:
        ValueError: the model cannot be loaded, or its targets are refused as `add_sora` would
            refuse them.
    """
    import torch

    from .models import (
        FLOAT_DTYPES,
        floating_modules,
        resolve_base_dtype,
        resolve_precision,
        skeleton,
    )
    from .sora import resolve_heads, resolve_targets

    where = torch.device(device)
    base_dtype = _resolved(config.base_dtype, resolve_base_dtype, where)
    precision = _resolved(config.precision, resolve_precision, where)
    # A quantised base keeps its other weights in the float dtype `auto` gives (`load_base`).
    float_dtype = _resolved(
        "auto" if base_dtype not in FLOAT_DTYPES else base_dtype, resolve_base_dtype, where
    )
    model = skeleton(config.model)
    sora_config = config.sora_config()
    heads = resolve_heads(model, sora_config)
    targets = resolve_targets(model, sora_config.target_modules, exclude=heads)
    floating = (
        floating_modules(model, config.modules_to_save) if base_dtype not in FLOAT_DTYPES else None
    )
    weights = frozen_weight_bytes(
        model, heads=heads, floating=floating, base_dtype=base_dtype, float_dtype=float_dtype
    )
    adapter = adapter_params(model, targets, config.r_max)
    head = sum(p.numel() for name in heads for p in model.get_submodule(name).parameters())
    per_adapter = TRAINED_BYTES + (ADALORA_ALLOCATOR_BYTES if config.method == "adalora" else 0)
    sixteen_bit = precision in ("bf16", "fp16") or float_dtype in ("bf16", "fp16")
    activations = activation_bytes(
        model,
        targets,
        # A worker's slice of every batch; the last worker's of a short batch is smaller.
        batch_size=-(-config.batch_size // workers),
        max_length=config.max_length,
        gradient_checkpointing=config.gradient_checkpointing,
        element_bytes=2 if sixteen_bit else 4,
        # The adapter computes in fp32: a 16-bit input is copied to fp32 (to the autocast
        # dtype under autocast) for each adapted linear, and kept for its backward pass.
        adapter_input_bytes=(2 if precision in ("bf16", "fp16") else 4) if sixteen_bit else 0,
        probabilities_kept=_attention_probabilities_kept(model, where),
        inputs_kept=base_dtype == "int8",
    )
    parts = [
        MemoryPart("frozen weights", weights, _weights_detail(base_dtype, float_dtype)),
        MemoryPart("adapter", adapter * per_adapter, f"{adapter:,} parameters × {per_adapter} B"),
        MemoryPart("head", head * TRAINED_BYTES, f"{head:,} parameters × {TRAINED_BYTES} B"),
        MemoryPart("activations", activations, _activations_detail(config, workers)),
    ]
    if workers > 1:
        trained = adapter + head
        parts.append(
            MemoryPart(
                "all-reduce",
                worker_all_reduce_bytes(trained),
                f"{trained:,} gradients × 4 B, summed across {workers} workers",
            )
        )
    if where.type == "cuda":
        tensors = sum(part.bytes for part in parts)
        parts += [
            MemoryPart(GPU_OVERHEADS[0], CUDA_CONTEXT_BYTES, "per process, lazy module loading"),
            MemoryPart(
                GPU_OVERHEADS[1],
                round(tensors * ALLOCATOR_SLACK),
                f"{ALLOCATOR_SLACK:.0%} of the tensors above",
            ),
        ]
    return MemoryEstimate(
        tuple(parts), device=where.type, base_dtype=base_dtype, precision=precision
    )


def worker_all_reduce_bytes(trained_params: int) -> int:
    """What one data-parallel worker of a trial needs beyond a one-process trial at its share of
    the batch: a copy of the trained parameters' gradients, fp32, 4 B each.

    Each worker keeps the whole frozen base, the adapter and the head with their AdamW states,
    as DDP's replicas do. Where DDP would hold its gradient buckets, `Workers.reduce_gradients`
    concatenates the gradients into one flat tensor and sums that across the workers: the same
    one copy. It lives after the backward pass, when the activations are freed, so adding it to
    them is an upper bound. Evaluation needs nothing more than one process's: each worker scores
    whole batches of `eval_batch_size` (not counted for one process either: it keeps no
    activations). Not counted: NCCL's own buffers, which it allocates outside torch's allocator
    (only between whole GPUs; on GPU shares the workers talk through gloo, in host memory); the
    CUDA context's round figure is what covers them. Not measured here."""
    return trained_params * 4


def _resolved(value: str, resolve: Callable[[str, torch.device], str], device: torch.device) -> str:
    """`value` as `resolve` (`models.resolve_base_dtype`, `models.resolve_precision`) resolves
    it for a trial on `device`; `auto` for a GPU that is not here: bf16 (see `estimate_memory`)."""
    import torch

    if value == "auto" and device.type == "cuda" and not torch.cuda.is_available():
        return "bf16"
    return resolve(value, device)


def frozen_weight_bytes(
    model: torch.nn.Module,
    *,
    heads: list[str],
    floating: list[str] | None,
    base_dtype: str,
    float_dtype: str,
) -> int:
    """Bytes of the weights `model` keeps frozen: every parameter outside `heads`, in
    `float_dtype`, but for a quantised `base_dtype` (`floating` not `None`) the weight of every
    linear outside `floating` in NF4 or LLM.int8, as bitsandbytes stores them."""
    from .models import FLOAT_DTYPES
    from .sora.layer import base_features
    from .sora.targets import LINEAR_TYPES, inside

    total = 0
    for name, module in model.named_modules():
        if inside(name, heads):
            continue
        for param_name, param in module.named_parameters(recurse=False):
            quantised = (
                base_dtype not in FLOAT_DTYPES
                and param_name == "weight"
                and isinstance(module, LINEAR_TYPES)
                and not inside(name, floating or [])
            )
            if not quantised:
                total += param.numel() * FLOAT_BYTES[float_dtype]
            elif base_dtype == "nf4":
                total += round(param.numel() * NF4_BYTES_PER_WEIGHT)
            else:
                rows = base_features(module)[1]
                total += param.numel() * INT8_BYTES_PER_WEIGHT + rows * INT8_BYTES_PER_ROW
    return total


def adapter_params(model: torch.nn.Module, targets: list[str], r_max: int) -> int:
    """Parameters of SoRA's adapters on `targets`: r_max · (in + out) and the gate's r_max, each."""
    from .sora.layer import base_features

    return sum(r_max * (sum(base_features(model.get_submodule(name))) + 1) for name in targets)


def activation_bytes(
    model: torch.nn.Module,
    targets: list[str],
    *,
    batch_size: int,
    max_length: int,
    gradient_checkpointing: bool,
    element_bytes: int,
    adapter_input_bytes: int,
    probabilities_kept: bool,
    inputs_kept: bool = False,
) -> int:
    """Bytes a training step of `model` keeps for its backward pass at `batch_size` rows of
    `max_length` tokens, activations of `element_bytes` each, and the gradients in flight at its
    peak (the `*_TERMS` constants above):

    - a block keeps hidden, key/value and intermediate widths a token; each adapted linear, an
      `adapter_input_bytes` copy of its input (0: none); attention that keeps its probabilities
      (`probabilities_kept`), scaled queries and keys and three tensors of heads × length, fp32;
    - outside the blocks, the embeddings' output and the head's input;
    - with `gradient_checkpointing`, every block keeps only its input and one block at a time
      is recomputed in the backward pass; but with `inputs_kept` (an int8 base, see above) every
      block keeps its linears' inputs too (`linear_inputs`).
    """
    from .sora.layer import base_features
    from .sora.targets import linear_layers, transformer_blocks

    config = model.config
    hidden, heads = config.hidden_size, config.num_attention_heads
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
    intermediate = intermediate or 4 * hidden  # GPT-2's n_inner: none means 4 × hidden
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    key_value = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    blocks = [
        f"{name}.{i}"
        for name in transformer_blocks(model)
        for i in range(len(model.get_submodule(name)))
    ]
    first = blocks[0] + "."
    widening = sum(
        base_features(model.get_submodule(name))[1] == intermediate
        for name in linear_layers(model)
        if name.startswith(first)
    )
    adapted_inputs = sum(
        base_features(model.get_submodule(name))[0] for name in targets if name.startswith(first)
    )
    block = HIDDEN_TERMS * hidden + KV_TERMS * key_value
    block += INTERMEDIATE_TERMS * widening * intermediate
    block_bytes = block * element_bytes + adapted_inputs * adapter_input_bytes
    if probabilities_kept:
        attention = MATH_ATTENTION_HIDDEN_TERMS * hidden
        attention += MATH_ATTENTION_PROBABILITY_TERMS * heads * max_length
        block_bytes += attention * MATH_ATTENTION_BYTES
    kept = OUTSIDE_TERMS * hidden + BACKWARD_TERMS * intermediate
    if gradient_checkpointing:
        kept += len(blocks) * CHECKPOINTED_TERMS * hidden
        kept += len(blocks) * linear_inputs(model, first) if inputs_kept else 0
        per_token = kept * element_bytes + block_bytes
    else:
        per_token = kept * element_bytes + len(blocks) * block_bytes
    return batch_size * max_length * per_token


def linear_inputs(model: torch.nn.Module, block: str) -> int:
    """The width of the distinct inputs of the linears in `block` (a name ending in a dot), a
    token: q, k and v read one input, a projection after attention its own, and the others one
    per parent module and width (Llama's gate and up share one)."""
    from .sora.layer import base_features
    from .sora.targets import attention_roles, linear_layers

    roles = attention_roles(model)
    widths = {}
    for name in linear_layers(model):
        if not name.startswith(block):
            continue
        width = base_features(model.get_submodule(name))[0]
        role = roles.get(name)
        if role in ("q", "k", "v", "qkv"):
            widths["qkv"] = width
        else:
            widths[name if role == "o" else (name.rpartition(".")[0], width)] = width
    return sum(widths.values())


def _attention_probabilities_kept(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether attention keeps its probabilities (heads × length² a row) for its backward pass:
    with eager attention, or with attention dropout on the CPU, where torch's fused attention
    takes no dropout and falls back to its math kernel. The fused kernels on a GPU recompute
    them instead."""
    config = model.config
    dropout = max(
        (getattr(config, name, 0.0) or 0.0 for name in ATTENTION_DROPOUT_NAMES), default=0.0
    )
    eager = getattr(config, "_attn_implementation", None) == "eager"
    return eager or (dropout > 0 and device.type == "cpu")


def _weights_detail(base_dtype: str, float_dtype: str) -> str:
    if base_dtype == "nf4":
        return f"linears NF4 ({NF4_BYTES_PER_WEIGHT:.4f} B a weight), the rest {float_dtype}"
    if base_dtype == "int8":
        return f"linears int8 with fp32 row scales, the rest {float_dtype}"
    return base_dtype


def _activations_detail(config: TrialConfig, workers: int) -> str:
    checkpointing = ", gradient checkpointing" if config.gradient_checkpointing else ""
    rows = f"{config.batch_size}" if workers == 1 else f"{config.batch_size} / {workers} workers"
    return f"batch {rows} × {config.max_length} tokens{checkpointing}"
