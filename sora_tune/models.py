"""Building a trial's model: the backbone's tokenizer, set to pad a classifier's batches, the
backbone with its task head at the trial's `base_dtype` and the adapter, and the check that the
targets fit the model before anything is loaded.
"""

from __future__ import annotations

import re

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from .config import TrialConfig, default_model
from .data import GlueTask, get_task
from .sora import add_adalora, add_sora, resolve_heads, resolve_targets, task_heads

FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bf16 natively: a CUDA GPU from Ampere on. Older GPUs (T4,
    V100) only emulate it, slowly, and torch counts emulation as support unless told not to."""
    if device.type != "cuda":
        return False
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_base_dtype(base_dtype: str, device: torch.device) -> str:
    """The base_dtype a trial on `device` loads its backbone in. `auto` is bf16 on a GPU that
    computes in it natively (QLoRA's recipe and transformers' bitsandbytes docs compute in
    bf16; torchtune's recipes load bf16), fp16 on an older GPU (transformers' training docs:
    bf16 from Ampere on, fp16 before), and fp32 on the CPU, where most processors compute in
    bf16 and fp16 more slowly than in fp32 (as `precision`'s auto)."""
    if base_dtype != "auto":
        return base_dtype
    if device.type == "cuda":
        return "bf16" if native_bf16(device) else "fp16"
    return "fp32"


def resolve_precision(precision: str, device: torch.device) -> str:
    """`bf16`, `fp16` or `fp32` for a trial on `device`: `auto` is bf16 on a CUDA device with
    native bf16 (Ampere and newer) and fp32 elsewhere: on older GPUs (T4, V100), which only
    emulate bf16, slowly, and on the CPU, where bf16 autocast is slower than fp32 on most
    processors."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def load_tokenizer(config: TrialConfig):
    """The backbone's tokenizer; the first thing a trial or a search loads from the model.

    Ready to pad batches for a classifier: a decoder's tokenizer without a pad token pads with
    its end-of-sequence token (`use_eos_as_pad`), and every tokenizer pads on the right.

    Raises:
        ValueError: the model cannot be loaded (e.g. a Hub id that does not exist), or its
            tokenizer has neither a pad nor an end-of-sequence token.
    """
    try:
        return classifier_tokenizer(config.model or default_model())
    except (OSError, ValueError) as err:  # transformers says ValueError for a folder of no model
        raise _cannot_load(config.model, err) from None


def classifier_tokenizer(model: str):
    """The tokenizer of `model`, set to pad batches for a sequence classifier: eos as the pad
    token where there is none (`use_eos_as_pad`), on the right. Trials and the registered model
    (which saves it) both use it, so serving pads as training did."""
    tokenizer = AutoTokenizer.from_pretrained(model)
    use_eos_as_pad(tokenizer)
    # Right padding keeps every real token at the position it has unpadded (decoders number
    # positions from the first slot, pads included); transformers' sequence classifiers read the
    # last token that is not a pad on either side.
    tokenizer.padding_side = "right"
    return tokenizer


def _cannot_load(model: str | None, err: Exception) -> ValueError:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ValueError(f"model {model!r} cannot be loaded: {reason}")


PAD_FROM_EOS = "pad_from_eos"  # the tokenizer attribute that records `use_eos_as_pad`'s choice


def use_eos_as_pad(tokenizer) -> bool:
    """Give a tokenizer without a pad token (most decoders') its end-of-sequence token as pad.
    The classifier then reads each row's last token that is not eos: the text's last (or the one
    before an eos the tokenizer appends, the same in training and serving). The choice is
    recorded as the tokenizer's `pad_from_eos` attribute, for the trial to log. Returns it.

    Raises:
        ValueError: the tokenizer has neither a pad nor an end-of-sequence token.
    """
    needed = tokenizer.pad_token is None
    if needed and tokenizer.eos_token is None:
        raise ValueError(
            f"tokenizer of {tokenizer.name_or_path!r} has neither a pad nor an end-of-sequence "
            "token to pad batches with"
        )
    if needed:
        tokenizer.pad_token = tokenizer.eos_token
    setattr(tokenizer, PAD_FROM_EOS, needed)
    return needed


def build_model(
    config: TrialConfig,
    total_steps: int,
    task: GlueTask | None = None,
    *,
    tokenizer=None,
    device: torch.device | None = None,
) -> torch.nn.Module:
    """The backbone with its classification head (sized to `task`: the data's task from
    `data_task`; `None`: the GLUE task of `config`) and the adapter, ready to train, loaded at
    the trial's base_dtype for `device` (`None`: the CPU) by `load_base`.

    The model's `pad_token_id` is the tokenizer's (`load_tokenizer`'s, by default), which is
    how a decoder's classifier finds each row's last real token to classify.
    """
    task = task or get_task(config.task)
    tokenizer = tokenizer or load_tokenizer(config)
    model = load_base(config, task.num_labels, device or torch.device("cpu"))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False  # one forward pass per batch: a decoder's KV cache only costs
    if config.gradient_checkpointing:
        # Non-reentrant checkpointing works with a frozen backbone (no input needs a gradient);
        # the reentrant kind gives a frozen, quantised base's adapters no gradient at all.
        # transformers 5.24 renamed gradient_checkpointing_enable, an alias until v6.
        enable = getattr(model, "activation_checkpointing_enable", None)
        (enable or model.gradient_checkpointing_enable)({"use_reentrant": False})
    if config.method == "adalora":
        return add_adalora(
            model, config.sora_config(), total_steps=total_steps, target_r=config.adalora_target_r
        )
    return add_sora(model, config.sora_config())


def load_base(config: TrialConfig, num_labels: int, device: torch.device) -> PreTrainedModel:
    """The backbone with a new task head of `num_labels`, its weights stored as the trial's
    `base_dtype` (`resolve_base_dtype`) says: fp32, bf16 or fp16 whatever the checkpoint holds
    (transformers 5 would load its dtype), or quantised by bitsandbytes on `device`.

    - `nf4`: QLoRA's recipe: 4-bit NormalFloat with its quantisation constants quantised too
      (double quantisation), computing in the float dtype `auto` gives here (bf16 on a GPU that
      has it, fp32 on the CPU), packed into tensors of that dtype (float storage: every weight
      of the model then has a float dtype, as FSDP and DDP want).
    - `int8`: bitsandbytes' LLM.int8, not torchao's int8 weight-only: one library for both
      quantised bases, the same skip list for the head, and PEFT's AdaLoRA baseline runs on
      its layers (it has none for torchao's); its outlier columns in 16 bits keep large
      models' accuracy (Dettmers et al. 2022). Nor was torchao's faster on this CPU (a
      576→1536 layer, 512 tokens, forward and backward: 135 ms against LLM.int8's 101 ms). A
      base the user quantised with torchao still takes SoRA (`sora.layer.base_kind`).

    The rest of a quantised model (embeddings, norms) stays in that float dtype, not fp32 as
    PEFT's `prepare_model_for_kbit_training` casts it (about 2 GB of a 70B model). The head,
    the pooler and `modules_to_save` are never quantised; `add_sora` keeps what it trains in
    fp32.
    """
    base_dtype = resolve_base_dtype(config.base_dtype, device)
    float_dtype = FLOAT_DTYPES.get(base_dtype) or FLOAT_DTYPES[resolve_base_dtype("auto", device)]
    quantised = {}
    if base_dtype in ("int8", "nf4"):
        from transformers import BitsAndBytesConfig

        kept = unquantised_modules(config.model, config.modules_to_save)
        quantised["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=base_dtype == "int8",
            load_in_4bit=base_dtype == "nf4",
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=float_dtype,
            bnb_4bit_quant_storage=float_dtype,
            # Full module names: transformers reads them as regular expressions (or endings).
            llm_int8_skip_modules=[re.escape(name) for name in kept],
        )
        quantised["device_map"] = {"": device}  # bitsandbytes quantises as it loads there
    return AutoModelForSequenceClassification.from_pretrained(
        config.model or default_model(), num_labels=num_labels, dtype=float_dtype, **quantised
    )


def unquantised_modules(model: str | None, modules_to_save: list[str] | None) -> list[str]:
    """What a quantised base of `model` (`None`: the packaged backbone) keeps in floats: its
    task heads and pooler (`task_heads`) and `modules_to_save`, by full name."""
    return floating_modules(skeleton(model), modules_to_save)


def floating_modules(model: torch.nn.Module, modules_to_save: list[str] | None) -> list[str]:
    """What a quantised base of the task model `model` keeps in floats (see
    `unquantised_modules`), by full name."""
    return sorted(set(task_heads(model)) | set(modules_to_save or ()))


def skeleton(model: str | None) -> PreTrainedModel:
    """The task model of `model` (`None`: the packaged backbone) built from its configuration
    on the meta device: its modules and shapes, no weights and no memory. The head's size is
    the configuration's default: it decides no module's name.

    Raises:
        ValueError: the model cannot be loaded.
    """
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(model or default_model())
    except (OSError, ValueError) as err:
        raise _cannot_load(model, err) from None
    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(model_config)


def check_targets(config: TrialConfig) -> None:
    """Refuse `target_modules` (or `modules_to_save`) that does not fit the model, before any data
    or weights are loaded: on the model's `skeleton`, its targets resolved as `add_sora` resolves
    them.

    Raises:
        ValueError: the model cannot be loaded, or its targets are refused as `add_sora` would
            refuse them (a preset that does not fit the model, names that match nothing).
    """
    model = skeleton(config.model)
    sora_config = config.sora_config()
    resolve_targets(model, sora_config.target_modules, exclude=resolve_heads(model, sora_config))
