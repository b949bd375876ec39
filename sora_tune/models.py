"""Building a trial's model: the backbone's tokenizer, set to pad a classifier's batches, the
backbone with its task head and the adapter, and the check that the targets fit the model before
anything is loaded.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from .config import TrialConfig, default_model
from .data import GlueTask, get_task
from .sora import add_adalora, add_sora, resolve_heads, resolve_targets


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
        raise _cannot_load(config, err) from None


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


def _cannot_load(config: TrialConfig, err: Exception) -> ValueError:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ValueError(f"model {config.model!r} cannot be loaded: {reason}")


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
    config: TrialConfig, total_steps: int, task: GlueTask | None = None, *, tokenizer=None
) -> torch.nn.Module:
    """The backbone with its classification head (sized to `task`: the data's task from
    `data_task`; `None`: the GLUE task of `config`) and the adapter, ready to train.

    The model's `pad_token_id` is the tokenizer's (`load_tokenizer`'s, by default), which is
    how a decoder's classifier finds each row's last real token to classify.
    """
    task = task or get_task(config.task)
    tokenizer = tokenizer or load_tokenizer(config)
    # fp32 master weights whatever the checkpoint holds (transformers 5 loads its dtype):
    # `precision` is the autocast dtype of the computation.
    model = AutoModelForSequenceClassification.from_pretrained(
        config.model or default_model(), num_labels=task.num_labels, dtype=torch.float32
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False  # one forward pass per batch: a decoder's KV cache only costs
    if config.gradient_checkpointing:
        # Non-reentrant checkpointing works with a frozen backbone (no input needs a gradient).
        # transformers 5.24 renamed gradient_checkpointing_enable, an alias until v6.
        enable = getattr(model, "activation_checkpointing_enable", None)
        (enable or model.gradient_checkpointing_enable)({"use_reentrant": False})
    if config.method == "adalora":
        return add_adalora(
            model, config.sora_config(), total_steps=total_steps, target_r=config.adalora_target_r
        )
    return add_sora(model, config.sora_config())


def check_targets(config: TrialConfig) -> None:
    """Refuse `target_modules` (or `modules_to_save`) that does not fit the model, before any data
    or weights are loaded: the model is built from its configuration on the meta device (shapes,
    no memory) and its targets resolved as `add_sora` resolves them.

    Raises:
        ValueError: the model cannot be loaded, or its targets are refused as `add_sora` would
            refuse them (a preset that does not fit the model, names that match nothing).
    """
    from transformers import AutoConfig

    try:
        # The head's size does not decide the targets: the config's default number of labels.
        model_config = AutoConfig.from_pretrained(config.model or default_model())
    except (OSError, ValueError) as err:
        raise _cannot_load(config, err) from None
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(model_config)
    sora_config = config.sora_config()
    resolve_targets(model, sora_config.target_modules, exclude=resolve_heads(model, sora_config))
