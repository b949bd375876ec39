"""One trial: fine-tune a backbone with SoRA (or a baseline) on one GLUE task, top to bottom.

data → model → optimizers → loop (train an epoch, score it, checkpoint, report) → prune → export.

`train_trial(config)` is what the search runs on every worker; the CLI's `train` is a thin shell
around it. After each epoch it calls `report(metrics, checkpoint_dir)` with the keys in
`REPORT_KEYS`; resuming from a checkpoint gives the same result as not stopping, on any device.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import ClassLabel, DatasetDict
from torch.distributed.fsdp import FSDPModule
from torch.utils.data import DataLoader

from .config import DATA_FIELDS, TrialConfig, check_batch_size, check_shard_base
from .data import (
    DataLocation,
    DataSource,
    GlueTask,
    OwnData,
    compute_metrics,
    data_sources,
    get_task,
    glue_sources,
    load_glue,
    load_own_data,
    make_dataloader,
    make_splits,
    own_task,
    pair_separator,
    shard_loader,
    tokenize_splits,
)
from .distributed import ONE_PROCESS, Workers
from .models import (
    PAD_FROM_EOS,
    build_model,
    load_tokenizer,
    resolve_base_dtype,
    resolve_precision,
)
from .sora import (
    ProximalGateOptimizer,
    adalora_state,
    after_optimizer_step,
    export_peft,
    gate_quantiles,
    gates_thresholded,
    head_params,
    load_adalora_state,
    load_adapter,
    param_groups,
    prune,
    rank_pattern,
    retained_params,
    save_adapter,
)

REPORT_KEYS = (
    "epoch",  # epochs trained, fractional when evaluations fall inside an epoch (eval_steps)
    "step",  # optimizer steps trained
    "evaluation",  # 1, 2, …: the MLflow step of this report's metrics
    "train_loss",
    "train_score",
    "val_score",
    "test_score",
    "nonzero_rank",
    "retained_params",
    "stage",
    "stage_end",  # whether this evaluation ends a stage of a front-tracing trial
    "xi",
    "xi_total",
    "epoch_time_s",  # since the last evaluation: an epoch's time unless eval_steps is set
    "train_time_s",
    "examples_per_s",
    "padding_ratio",
)  # plus val_<metric> and test_<metric> for each of the task's metrics

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def default_device() -> torch.device:
    """The first GPU when there is one, else the CPU (a search passes the device Ray assigned)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device a trial trains on: `device`, or `default_device()` when it is `None`."""
    return torch.device(device) if device is not None else default_device()


def trial_dtypes(config: TrialConfig, device: torch.device) -> dict[str, str]:
    """How a trial on `device` computes and stores: its `precision` and `base_dtype`, `auto`
    resolved (`resolve_precision`, `models.resolve_base_dtype`)."""
    return {
        "precision": resolve_precision(config.precision, device),
        "base_dtype": resolve_base_dtype(config.base_dtype, device),
    }


def autocast(device: torch.device, precision: str):
    """Autocast to the trial's precision (`fp32`: none). Weights stay fp32."""
    return torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision != "fp32")


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def own_data_location(config: TrialConfig) -> DataLocation:
    """Where the trial's own data are: its settings of the names of `DataLocation`'s fields."""
    fields = dataclasses.fields(DataLocation)
    return DataLocation(**{field.name: getattr(config, field.name) for field in fields})


def own_data(config: TrialConfig) -> OwnData:
    """The user's own data of a trial, read and checked (`load_own_data`)."""
    return load_own_data(
        own_data_location(config),
        text_columns=config.text_fields,
        label_column=config.label_field,
        problem_type=config.problem_type,
        metric=config.metric,
    )


def data_task(config: TrialConfig, data: DatasetDict) -> GlueTask:
    """The task of a trial's tokenised data: the GLUE task, or the user's own data described by
    the settings and the class names the data carry (`labels` is a `ClassLabel`, or float
    scores for regression); `metric` is the primary."""
    if not config.own_data:
        task = get_task(config.task)
        return dataclasses.replace(task, primary=config.metric or task.primary)
    labels = data["train"].features["labels"]
    names = tuple(labels.names) if isinstance(labels, ClassLabel) else None
    return own_task(config.data_name, config.text_fields, names, config.metric)


def data_lineage(config: TrialConfig) -> tuple[DataSource, ...]:
    """Where the trial's data come from, with content digests: the user's files or dataset, or
    GLUE's."""
    if config.own_data:
        return data_sources(own_data_location(config))
    return glue_sources(config.task, config.data_dir)


def trial_data(
    config: TrialConfig,
    data: DatasetDict | None = None,
    sources: tuple[DataSource, ...] | None = None,
) -> tuple[DatasetDict, GlueTask, tuple[DataSource, ...]]:
    """A trial's tokenised data, their task and their sources: as the search shares them, or
    prepared here (`train`, or a search whose data settings are searched)."""
    data = data if data is not None else prepare_data(config)
    sources = sources if sources is not None else data_lineage(config)
    return data, data_task(config, data), sources


def prepare_data(config: TrialConfig, tokenizer=None) -> DatasetDict:
    """Load, split and tokenise the data (cached on disk): `train`, `val`, `test` (when there
    is a test set), `train_eval`. The user's own data are keyed in the cache by their files'
    digests, not by hashing their rows.

    The search calls this once and shares the result with every trial.
    """
    tokenizer = tokenizer or load_tokenizer(config)
    digests = None
    if config.own_data:
        own = own_data(config)
        raw, task = own.raw, own.task
        # Everything that decides the rows: every data setting (the label column among them),
        # the files' contents and the task with its label names.
        settings = {name: getattr(config, name) for name in DATA_FIELDS}
        base = [settings, [s.digest for s in own.sources], repr(task)]
        digests = {name: json.dumps([*base, name]) for name in ("train", "val", "test")}
    else:
        raw, task = load_glue(config.task, config.data_dir), get_task(config.task)
    splits = make_splits(
        raw,
        task,
        val_size=int(config.val_size) if config.val_size >= 1 else config.val_size,
        seed=config.seed,
        max_train_samples=config.max_train_samples,
        max_eval_samples=config.max_eval_samples,
    )
    data = tokenize_splits(
        splits,
        task,
        tokenizer,
        max_length=config.max_length,
        cache_dir=config.cache_dir,
        digests=digests,
        separator=trial_pair_separator(config, task, tokenizer),
    )
    train = data["train"]
    subset = min(config.train_eval_samples, len(train))
    data["train_eval"] = train.shuffle(seed=config.seed).select(range(subset))
    return data


def trial_pair_separator(config: TrialConfig, task: GlueTask, tokenizer) -> str | None:
    """What joins the trial's text pairs (`pair_separator`); `None` for single texts, or where
    the tokenizer's pair template separates them."""
    return pair_separator(tokenizer, config.pair_separator) if len(task.text_fields) == 2 else None


def make_loaders(config: TrialConfig, data: DatasetDict, tokenizer, workers: Workers = ONE_PROCESS):
    """The shuffled training loader and the evaluation loaders (`train_eval`, `val`, and `test`
    when there is a test set): of several `workers`, this one's share of every training batch
    and of the evaluation batches."""
    train_loader = make_dataloader(
        data["train"],
        tokenizer,
        batch_size=config.batch_size,
        shuffle=True,
        seed=config.seed,
        group_by_length=config.group_by_length,
    )
    eval_loaders = make_eval_loaders(config, data, tokenizer)
    if workers.size > 1:
        train_loader = shard_loader(train_loader, workers.rank, workers.size)
        eval_loaders = {
            split: shard_loader(loader, workers.rank, workers.size, whole_batches=True)
            for split, loader in eval_loaders.items()
        }
    return train_loader, eval_loaders


def make_eval_loaders(config: TrialConfig, data: DatasetDict, tokenizer) -> dict[str, DataLoader]:
    """The evaluation loaders, in order, of the splits `data` has: `train_eval`, `val`, `test`."""
    return {
        split: make_dataloader(
            data[split],
            tokenizer,
            batch_size=config.eval_batch_size,
            shuffle=False,
            group_by_length=True,
        )
        for split in ("train_eval", "val", "test")
        if split in data
    }


@dataclass
class Optimization:
    """What changes the weights: AdamW for adapter and head, the proximal optimizer for the gates
    (SoRA only), their learning-rate schedules and the fp16 gradient scaler."""

    adamw: torch.optim.AdamW
    gate_optimizer: ProximalGateOptimizer | None
    schedulers: list[torch.optim.lr_scheduler.LambdaLR]
    scaler: torch.amp.GradScaler
    workers: Workers = ONE_PROCESS  # whose gradients are summed before every step

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.adamw, self.gate_optimizer) if o is not None]

    def step(self, loss: torch.Tensor, trainable: list[torch.nn.Parameter], max_grad_norm: float):
        """Backward, sum the workers' gradients, clip every trainable tensor together, step,
        advance the schedules."""
        self.scaler.scale(loss).backward()
        # Before anything reads a gradient: every rank then unscales, clips and steps the same
        # numbers, so weights, AdamW states and the gates' thresholding agree bit for bit.
        self.workers.reduce_gradients(trainable)
        for optimizer in self.optimizers:
            self.scaler.unscale_(optimizer)  # clip the true gradients
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
        for optimizer in self.optimizers:
            self.scaler.step(optimizer)  # skipped when fp16 overflowed
        self.scaler.update()
        for scheduler in self.schedulers:
            scheduler.step()

    def zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for optimizer, saved in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)  # moves the state to the parameters' device
        for scheduler, saved in zip(self.schedulers, state["schedulers"], strict=True):
            scheduler.load_state_dict(saved)
        if state["scaler"]:  # empty when the scaler was off
            self.scaler.load_state_dict(state["scaler"])


def configure_optimization(
    model: torch.nn.Module,
    config: TrialConfig,
    *,
    steps_per_epoch: int,
    device: torch.device,
    precision: str,
    workers: Workers = ONE_PROCESS,
) -> Optimization:
    """AdamW for the adapter matrices and the head (no decay on biases and norms) and the proximal
    optimizer for the gates (SoRA only: the LoRA baseline's gates are frozen).

    In `official` mode the gates' learning rate η follows the same warm-up and decay as `lr`, as
    the authors' `run_glue.py` schedules its `--sparse_lr`; eq. 10's η (`paper`) is constant.
    """
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
            eta=config.effective_eta,
            lam=config.lam,
            # the first stage's ξ; the loop sets every stage's own as it starts
            xi=next(iter(config.stage_xis(steps_per_epoch).values()))
            if config.gate_mode == "official"
            else None,
            mode=config.gate_mode,
        )
    scheduled = [adamw] + ([gate_optimizer] if config.gate_mode == "official" else [])
    factor = lr_lambda(config, steps_per_epoch)
    return Optimization(
        adamw=adamw,
        gate_optimizer=gate_optimizer,
        schedulers=[
            torch.optim.lr_scheduler.LambdaLR(o, factor) for o in scheduled if o is not None
        ],
        # fp16's narrow range needs loss scaling; bf16 has fp32's range and needs none.
        scaler=torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
        workers=workers,
    )


def lr_lambda(config: TrialConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Linear warm-up then linear decay to 0, restarted at every ξ stage (`stage_lr restart`):
    later stages must not train on a schedule that has already decayed to zero (the authors'
    sparsifying bug); or once over the whole trial (`continue`), so that its stages go on
    training the dense phase's model at the decaying rate instead of warming up again."""
    stages = config.stage_steps(steps_per_epoch).values()
    starts = [span.start for span in stages] if config.stage_lr == "restart" else [0]
    bounds = [*starts, config.epochs * steps_per_epoch]

    def factor(step: int) -> float:
        stage = min(bisect.bisect_right(bounds, step) - 1, len(bounds) - 2)
        start, end = bounds[stage], bounds[stage + 1]
        warmup = max(1, int(config.warmup_ratio * (end - start)))
        if step - start < warmup:
            return (step - start + 1) / warmup
        return max(0.0, (end - step) / max(1, end - start - warmup))

    return factor


@dataclass
class TrainingStats:
    """What training from one evaluation to the next did."""

    loss: float  # mean training loss per example
    examples: int  # rows trained on
    steps: int  # optimizer steps taken
    seconds: float  # wall time of the training
    padding_ratio: float  # padded share of the token slots
    scoring_seconds: float = 0.0  # wall time of the evaluation that follows, set once scored


def batches_from(loader, step: int) -> Iterator[dict]:
    """The training batches from optimizer step `step` (0-based) on, epoch after epoch, in the
    order an uninterrupted run sees them: a trial resumed from a checkpoint taken inside an epoch
    goes on with that epoch's order where it stopped."""
    epoch, offset = divmod(step, len(loader))
    # The loader's global batches: one process's, or those a worker takes its share of.
    batches = loader.batch_sampler
    while True:
        batches.sampler.set_epoch(epoch, start=offset * batches.batch_size)
        yield from loader
        epoch, offset = epoch + 1, 0


def train_steps(
    model: torch.nn.Module,
    loader,
    optimization: Optimization,
    *,
    config: TrialConfig,
    start: int,
    end: int,
    device: torch.device,
    precision: str,
    progress: bool = False,
) -> TrainingStats | None:
    """Optimizer steps `start` … `end - 1` (0-based, across epochs); `None` when the loss stopped
    being finite. Of several workers, each trains on its share of every batch, and the
    statistics are the global batches'."""
    began = time.perf_counter()
    model.train()
    workers = optimization.workers
    workers.seed(config.seed, start)
    trainable = [p for p in model.parameters() if p.requires_grad]
    loss_sum, examples, tokens, padded = 0.0, 0, 0, 0
    total = config.epochs * len(loader)
    steps = zip(range(start, end), batches_from(loader, start), strict=False)  # batches: endless
    bar = _progress(steps, progress, f"steps {start + 1}-{end}/{total}", total=end - start)
    for step, batch in bar:
        batch = {k: v.to(device) for k, v in batch.items()}
        stepped = train_step(
            model,
            batch,
            optimization,
            trainable,
            config=config,
            step=step,
            device=device,
            precision=precision,
        )
        if stepped is None:
            return None
        loss, rows = stepped
        loss_sum += loss.item() * rows
        examples += rows
        if batch:  # a worker's share of a short last batch may be empty
            mask = batch["attention_mask"]
            tokens += mask.numel()
            padded += mask.numel() - int(mask.sum())
        if progress:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    tokens, padded = workers.sum([tokens, padded], device)
    return TrainingStats(
        loss=loss_sum / max(examples, 1),
        examples=examples,
        steps=end - start,
        seconds=time.perf_counter() - began,
        padding_ratio=padded / max(tokens, 1),
    )


def train_step(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    optimization: Optimization,
    trainable: list[torch.nn.Parameter],
    *,
    config: TrialConfig,
    step: int,
    device: torch.device,
    precision: str,
) -> tuple[torch.Tensor, int] | None:
    """Optimizer step `step` (0-based) on `batch`, already on `device`: forward, the gates'
    penalty, backward, clip, step. Returns the global batch's mean loss and rows, or `None`
    (nothing stepped, on any worker) when the loss is not finite.

    Of several workers, each weights its loss and penalty by its share of the global batch's
    rows, so that the summed gradients are one process's (`Workers.share`).
    """
    rows = len(batch["labels"]) if batch else 0
    loss = torch.zeros((), device=device)
    if rows:
        with autocast(device, precision):
            loss = model(**batch).loss
    elif isinstance(model, FSDPModule):
        loss = stand_in_forward(model, device, precision).sum() * 0.0  # zero gradients
    mean, weight, all_rows = optimization.workers.share(loss, rows)
    if not torch.isfinite(mean):
        return None
    gates = optimization.gate_optimizer
    penalty = gates.l1_penalty() if gates is not None else 0.0
    optimization.step((loss + penalty) * weight, trainable, config.max_grad_norm)
    after_optimizer_step(model, step)
    optimization.zero_grad()
    return mean, all_rows


def stand_in_forward(model: FSDPModule, device: torch.device, precision: str) -> torch.Tensor:
    """The logits of a stand-in row of one token, to be thrown away. A worker of a sharded base
    (`Workers.shard_base`) with nothing to compute (an empty share of a short last batch, or one
    scoring batch fewer) runs it all the same: every worker must join FSDP's gathers of every
    block's weights. Not a batch of no rows: attention layers cannot reshape an empty batch."""
    token = torch.zeros((1, 1), dtype=torch.long, device=device)
    with autocast(device, precision):
        return model(input_ids=token, attention_mask=torch.ones_like(token)).logits


@torch.no_grad()
def evaluate(
    model, loader, task, device, precision: str = "fp32", workers: Workers = ONE_PROCESS
) -> dict[str, float]:
    """The task's metrics on `loader`'s rows; of several workers, on every worker's batches,
    gathered in one process's order."""
    model.eval()
    scored = []
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(device, precision):
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        scored.append((logits.float().cpu(), batch["labels"].cpu()))
    if isinstance(model, FSDPModule):
        # Worker r scores every size-th batch from r: the first workers may score one more.
        most = -(-int(workers.sum([len(scored)], device)[0]) // workers.size)
        for _ in range(most - len(scored)):
            stand_in_forward(model, device, precision)
    predictions, labels = zip(*workers.gather_batches(scored), strict=True)
    return compute_metrics(task, torch.cat(predictions).numpy(), torch.cat(labels).numpy())


def score_epoch(
    model,
    eval_loaders,
    task,
    device,
    precision: str,
    progress: bool = False,
    workers: Workers = ONE_PROCESS,
) -> dict[str, float]:
    """Memorization (`train_score` on a fixed training subset), `val_score` (selection) and
    `test_score` (GLUE dev or the test file, reported only; none without a test set), with
    `val_<metric>` and `test_<metric>`."""
    scores = {
        split: evaluate(
            model,
            _progress(loader, progress, f"scoring {split}"),
            task,
            device,
            precision,
            workers,
        )
        for split, loader in eval_loaders.items()
    }
    scored = {"train_score": scores["train_eval"]["score"], "val_score": scores["val"]["score"]}
    if "test" in scores:
        scored["test_score"] = scores["test"]["score"]
    for split in ("val", "test"):
        scored |= {f"{split}_{k}": v for k, v in scores.get(split, {}).items() if k != "score"}
    return scored


CHECKPOINT_PREFIX = "checkpoint-step"


def stage_adapter_dir(output_dir: str | os.PathLike, stage: int) -> Path:
    """Where a front-tracing trial exports the pruned adapter of the end of `stage`."""
    return Path(output_dir) / "stages" / f"stage-{stage}"


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in `output_dir` (written atomically, so complete if present)."""
    found = sorted(
        Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*"),
        key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)),
    )
    return found[-1] if found else None


def save_checkpoint(
    output_dir: Path,
    step: int,
    config: TrialConfig,
    model,
    optimization: Optimization,
    history: list[dict],
) -> Path:
    """Write the trial state after optimizer step `step` (tensors as safetensors, optimizer state
    as a tensors-only torch file), atomically, and drop older checkpoints."""
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    staging = Path(tempfile.mkdtemp(dir=output_dir, prefix=".checkpoint-"))
    save_adapter(model, staging / "adapter.safetensors")
    state = optimization.state_dict() | {
        "adalora": adalora_state(model),
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


def check_saved_config(saved: dict[str, Any], config: TrialConfig, *, where: str) -> None:
    """Refuse to continue (or read back) what a trial with other settings wrote to `where`.

    Raises:
        ValueError: naming the settings that differ.
    """
    # Through JSON, as they were saved: lists stay lists.
    current = json.loads(json.dumps(dataclasses.asdict(config)))
    changed = sorted(k for k, v in current.items() if saved.get(k) != v)
    if changed:
        raise ValueError(
            f"{where} holds a trial with other settings ({', '.join(changed)}); "
            "use another output directory"
        )


def check_checkpoint_config(path: Path, config: TrialConfig) -> None:
    """Refuse to resume from a checkpoint that a trial with other settings wrote."""
    check_saved_config(json.loads((path / "config.json").read_text()), config, where=str(path))


def load_checkpoint(path: Path, model, optimization: Optimization) -> list[dict]:
    """Restore what `save_checkpoint` wrote, onto whatever device the model is on now (a trial
    checkpointed on a GPU resumes on a CPU node and back); returns the metrics history so far."""
    load_adapter(model, path / "adapter.safetensors")
    # On the CPU first: the RNG state must be a CPU tensor, and the optimizers move their state
    # to their parameters' device when they load it.
    state = torch.load(path / "trainer_state.pt", weights_only=True, map_location="cpu")
    optimization.load_state_dict(state)
    load_adalora_state(model, state["adalora"])
    torch.set_rng_state(state["rng"])
    cuda_rng = state.get("cuda_rng")
    if (
        cuda_rng is not None
        and torch.cuda.is_available()
        and len(cuda_rng) == torch.cuda.device_count()
    ):
        torch.cuda.set_rng_state_all(cuda_rng)
    return json.loads((path / "history.json").read_text())


@dataclass
class TrialParts:
    """What a trial trains and scores with."""

    task: GlueTask
    train_loader: Any
    eval_loaders: dict[str, Any]
    model: torch.nn.Module
    optimization: Optimization

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_loader)


def build_trial(
    config: TrialConfig,
    data: DatasetDict,
    tokenizer,
    *,
    device: torch.device,
    precision: str,
    workers: Workers = ONE_PROCESS,
) -> TrialParts:
    """A trial's loaders over its tokenised `data`, its model with the adapter on `device`, and
    its optimizers, as `train_trial` trains with them (of several `workers`, this one's)."""
    task = data_task(config, data)
    train_loader, eval_loaders = make_loaders(config, data, tokenizer, workers)
    steps_per_epoch = len(train_loader)
    config.check_steps(steps_per_epoch)  # stages in steps that the epochs never reach
    total_steps = steps_per_epoch * config.epochs
    # A sharded base is loaded on the CPU and only each worker's shard goes to `device`: the
    # whole base need not fit one GPU.
    loaded_on = torch.device("cpu") if config.shard_base else device
    model = build_model(config, total_steps, task, tokenizer=tokenizer, device=loaded_on)
    workers.broadcast([p for p in model.parameters() if p.requires_grad])
    if config.shard_base:
        workers.shard_base(model, device)
    model = model.to(device)
    optimization = configure_optimization(
        model,
        config,
        steps_per_epoch=steps_per_epoch,
        device=device,
        precision=precision,
        workers=workers,
    )
    return TrialParts(task, train_loader, eval_loaders, model, optimization)


def train_trial(
    config: TrialConfig | dict[str, Any],
    *,
    report: Callable[[dict[str, Any], str | None], None] | None = None,
    output_dir: str | os.PathLike | None = None,
    resume_from: str | os.PathLike | None = None,
    data: DatasetDict | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    workers: Workers = ONE_PROCESS,
) -> dict[str, Any]:
    """Train one trial and return its final metrics (also written to `output_dir/metrics.json`).

    Args:
        config: A `TrialConfig` or a flat dict of its fields.
        report: Called after each epoch with the metrics (`REPORT_KEYS` and the task's metrics)
            and the path of that epoch's checkpoint (`None` on workers other than rank 0).
        output_dir: Where checkpoints, `adapter/` (the pruned adapter in PEFT format) and
            `metrics.json` go; a temporary folder if `None`.
        resume_from: A checkpoint folder to continue from; `None`: the newest checkpoint in
            `output_dir`, if any.
        data: Pre-tokenised splits from `prepare_data` (the search shares them across trials).
        device: Where to train; `None`: `default_device()`.
        progress: Show progress bars for training and scoring.
        workers: This process's place among the trial's data-parallel workers
            (`Workers.current()` in a torch.distributed process group). Every worker trains
            and scores its share and calls `report` after every evaluation; rank 0 alone writes
            checkpoints, the adapter and `metrics.json`.

    Returns:
        The last evaluation's metrics plus `status` (`finished` or `diverged`), `precision` and
        `base_dtype` (the ones used), `pad_from_eos` (whether eos padded the batches),
        `pair_separator` (what joined text pairs, `None`: nothing), `rank_pattern` and
        `head_params`.

    Raises:
        ValueError: bad configuration (before any data or model is loaded).
    """
    config = config if isinstance(config, TrialConfig) else TrialConfig.from_dict(config)
    check_batch_size(config.batch_size, workers.size)
    check_shard_base(config.shard_base, workers.size)
    output_dir = Path(output_dir or tempfile.mkdtemp(prefix="sora-trial-"))
    output_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = Path(resume_from) if resume_from else latest_checkpoint(output_dir)
    if checkpoint is not None:
        check_checkpoint_config(checkpoint, config)
    device = resolve_device(device)
    precision = resolve_precision(config.precision, device)
    seed_everything(config.seed)

    tokenizer = load_tokenizer(config)
    data = data if data is not None else prepare_data(config, tokenizer)
    trial = build_trial(
        config, data, tokenizer, device=device, precision=precision, workers=workers
    )
    model, optimization, steps_per_epoch = trial.model, trial.optimization, trial.steps_per_epoch
    history = load_checkpoint(checkpoint, model, optimization) if checkpoint is not None else []

    # The loop: train to the next evaluation, score, checkpoint, report
    status = "finished"
    done = history[-1]["step"] if history else 0
    for end in [step for step in config.evaluation_steps(steps_per_epoch) if step > done]:
        set_stage_xi(optimization, config, done, steps_per_epoch)
        stats = train_steps(
            model,
            trial.train_loader,
            optimization,
            config=config,
            start=done,
            end=end,
            device=device,
            precision=precision,
            progress=progress,
        )
        if stats is None:
            status = "diverged"
            break
        scoring_start = time.perf_counter()
        scores = score_epoch(
            model, trial.eval_loaders, trial.task, device, precision, progress, workers
        )
        stats.scoring_seconds = time.perf_counter() - scoring_start
        history.append(
            evaluation_metrics(
                model, optimization, config, end, steps_per_epoch, stats, scores, history
            )
        )
        saved = None
        if workers.main:
            saved = str(save_evaluation(output_dir, config, model, optimization, history))
        if report is not None:
            report(history[-1], saved)
        done = end

    result = trial_dtypes(config, device) | {
        "pad_from_eos": getattr(tokenizer, PAD_FROM_EOS),
        "pair_separator": trial_pair_separator(config, trial.task, tokenizer),
    }
    if status == "finished" and config.threshold_quantiles and history:
        result["threshold_points"] = threshold_points(
            trial,
            config,
            history[-1],
            output_dir,
            device=device,
            precision=precision,
            workers=workers,
        )
    return _finish(model, config, output_dir, history, status, result, write=workers.main)


def threshold_points(
    trial: TrialParts,
    config: TrialConfig,
    last: dict[str, Any],
    output_dir: Path,
    *,
    device: torch.device,
    precision: str,
    workers: Workers = ONE_PROCESS,
) -> list[dict[str, Any]]:
    """The front points of `threshold_quantiles` after the last evaluation `last`: stage k's is
    the trained adapter with its gate entries up to the k-th quantile of |g| zeroed, scored as
    an evaluation is and, when it keeps a rank, exported as that stage's pruned adapter. No
    training: each costs one scoring."""
    model = trial.model
    points = []
    taus = gate_quantiles(model, config.threshold_quantiles)  # none when every rank is pruned
    for stage, tau in enumerate(taus, start=1):
        with gates_thresholded(model, tau):
            scores = score_epoch(
                model, trial.eval_loaders, trial.task, device, precision, workers=workers
            )
            point = last | scores | {"stage": stage, "stage_end": True, "threshold": tau}
            point |= {"nonzero_rank": sum(rank_pattern(model).values())}
            point |= {"retained_params": retained_params(model)}
            if workers.main and point["nonzero_rank"] > 0:
                export_peft(model, stage_adapter_dir(output_dir, stage))
        points.append(point)
    return points


def stage_at_step(config: TrialConfig, step: int, steps_per_epoch: int) -> int:
    """The stage in force at optimizer step `step` (0-based)."""
    spans = config.stage_steps(steps_per_epoch)
    return next((stage for stage, span in spans.items() if step in span), max(spans))


def set_stage_xi(
    optimization: Optimization, config: TrialConfig, step: int, steps_per_epoch: int
) -> None:
    """Give the gates the ξ of the stage optimizer step `step` (0-based) belongs to."""
    gates = optimization.gate_optimizer
    xi = config.stage_xis(steps_per_epoch)[stage_at_step(config, step, steps_per_epoch)]
    if gates is not None and gates.xi != xi:  # paper mode sets ξ through λ: not needlessly
        gates.xi = xi


def epochs_trained(step: int, steps_per_epoch: int) -> int | float:
    """Epochs trained after optimizer step `step`: an int at an epoch's end, else the exact
    fraction. Never rounded: at 49k steps an epoch, a report 2 steps before the end rounded to
    4 decimals would read as the last epoch, and a trial stopped there as one that finished."""
    whole, rest = divmod(step, steps_per_epoch)
    return whole if rest == 0 else step / steps_per_epoch


def evaluation_metrics(
    model: torch.nn.Module,
    optimization: Optimization,
    config: TrialConfig,
    step: int,
    steps_per_epoch: int,
    stats: TrainingStats,
    scores: dict[str, float],
    history: list[dict[str, Any]],
) -> dict[str, Any]:
    """What is reported and logged after optimizer step `step`, following the evaluations in
    `history`: `REPORT_KEYS` and the task's scores."""
    stage = stage_at_step(config, step - 1, steps_per_epoch)
    gates = optimization.gate_optimizer
    xi = gates.xi if gates is not None else 0.0
    elapsed = stats.seconds + stats.scoring_seconds
    return {
        "epoch": epochs_trained(step, steps_per_epoch),
        "step": step,
        "evaluation": len(history) + 1,
        "train_loss": stats.loss,
        **scores,
        "nonzero_rank": sum(rank_pattern(model).values()),
        "retained_params": retained_params(model),
        "stage": stage,
        "stage_end": step in config.stage_ends(steps_per_epoch),
        "xi": xi,
        # what ξ can take off a gate over its stage: the pressure that transfers across sizes
        "xi_total": xi * len(config.stage_steps(steps_per_epoch)[stage]),
        "epoch_time_s": elapsed,
        "train_time_s": (history[-1]["train_time_s"] if history else 0.0) + elapsed,
        "examples_per_s": stats.examples / stats.seconds,
        "padding_ratio": stats.padding_ratio,
    }


def save_evaluation(
    output_dir: Path,
    config: TrialConfig,
    model: torch.nn.Module,
    optimization: Optimization,
    history: list[dict[str, Any]],
) -> Path:
    """After the evaluation that ends `history`: the stage's pruned adapter if it ends a stage of
    a front-tracing trial (a point of its front, servable on its own), then the checkpoint."""
    metrics = history[-1]
    if metrics["stage_end"] and metrics["nonzero_rank"] > 0:
        export_peft(model, stage_adapter_dir(output_dir, metrics["stage"]))
    return save_checkpoint(output_dir, metrics["step"], config, model, optimization, history)


def _progress(items, enabled: bool, description: str, total: int | None = None):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=description, leave=False, total=total)


def _finish(
    model,
    config: TrialConfig,
    output_dir: Path,
    history: list[dict],
    status: str,
    how: dict[str, Any],
    *,
    write: bool = True,
) -> dict:
    """Prune, export the adapter in PEFT format and write `metrics.json` (atomically), with
    `how` the trial ran (its precision and base dtype, whether eos padded its batches). Without
    `write` (a worker other than rank 0), the result alone: rank 0 writes the trial's files."""
    result: dict[str, Any] = (dict(history[-1]) if history else {}) | how
    result["status"] = status
    if not write:
        return result | {"config": dataclasses.asdict(config), "history": history}
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
