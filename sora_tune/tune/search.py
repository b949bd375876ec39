"""The distributed search: Ray Tune runs `train_trial` on every worker, Optuna proposes the
settings, MLflow keeps one parent run per search and one child run per trial.

Optuna receives each trial's last-epoch `val_score` and `retained_params`: the values of the
adapter the trial exports, so what the search optimises is what you can ship.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import mlflow
from datasets import Dataset, DatasetDict

from .. import __version__
from ..config import TrialConfig
from ..data import load_glue
from ..tracking import tracked_trial
from ..train import load_tokenizer, prepare_data
from ..uris import (
    DEFAULT_TRACKING_URI,
    check_no_password,
    check_tracking_uri,
    redact_uri,
    resolve_tracking_uri,
)
from .space import SearchSpace

if TYPE_CHECKING:
    import pyarrow.fs

Sampler = Literal["tpe", "nsga2", "gp", "random"]
SAMPLERS = ("tpe", "nsga2", "gp", "random")
OBJECTIVES = {"val_score": "max", "retained_params": "min"}
# Settings that change the tokenised data: when one is searched, each trial prepares its own.
DATA_KEYS = (
    "task",
    "data_dir",
    "model",
    "max_length",
    "max_train_samples",
    "max_eval_samples",
    "val_size",
    "seed",
    "train_eval_samples",
    "cache_dir",
)
SEARCH_STATE_FILE = "sora_tune_search.json"  # beside Ray's experiment state, for --resume


@dataclass
class SearchConfig:
    """How to search.

    Args:
        space: The validated search space (`load_search_space`), CLI overrides already fixed.
        num_samples: Number of trials.
        sampler: Optuna sampler: `tpe`, `nsga2`, `gp` or `random`.
        objective: `multi` (maximise val_score, minimise retained_params) or `val_score` alone.
        asha: Stop poor trials early with ASHA (single objective only).
        max_concurrent: At most this many trials at once; `None`: as many as resources allow.
        cpus_per_trial, gpus_per_trial: Resources of one trial; fractions of a GPU let several
            small trials share it.
        address: `None` starts a local Ray; `auto` or `ray://host:port` joins a cluster.
        storage_path: Where Ray keeps the experiment state; shared storage (NFS, s3://, gs://)
            for several nodes.
        name: The Ray experiment name (a folder under `storage_path`).
        mlflow_uri: MLflow tracking URI; a local sqlite file by default. A relative local store
            (`sqlite:///mlflow.db`, `file:mlruns`) is taken from the current folder.
        experiment_name: MLflow experiment.
        seed: Seeds the sampler.
        max_failures: Retries of a trial that crashed (a node lost, an exception).
    """

    space: SearchSpace
    num_samples: int = 8  # trials
    sampler: Sampler = "tpe"
    objective: Literal["multi", "val_score"] = "multi"
    asha: bool = False  # early stopping, single objective only
    max_concurrent: int | None = None  # None: as many as fit
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0  # fractions share a GPU
    address: str | None = None  # None: local Ray
    storage_path: str | None = None  # None: ./ray_results
    name: str | None = None  # None: "<experiment_name>-<timestamp>"
    mlflow_uri: str = DEFAULT_TRACKING_URI
    experiment_name: str = "sora-tune"
    seed: int = 0
    max_failures: int = 1  # retries of a crashed trial

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.objective not in ("multi", "val_score"):
            raise ValueError(f"objective must be multi or val_score, got {self.objective!r}")
        if self.asha and self.objective == "multi":
            raise ValueError(
                "asha early stopping needs a single objective: use objective val_score"
            )
        if self.cpus_per_trial <= 0 or self.gpus_per_trial < 0:
            raise ValueError("cpus_per_trial must be > 0 and gpus_per_trial >= 0")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {self.max_concurrent}")
        # Paths are taken from the user's folder here, on the driver: Ray starts every trial in
        # a folder of its own.
        if self.storage_path is None or "://" not in self.storage_path:
            self.storage_path = os.path.abspath(self.storage_path or "ray_results")
        self.mlflow_uri = resolve_tracking_uri(self.mlflow_uri)
        self.space = self.space.with_resolved_paths()
        self.name = self.name or f"{self.experiment_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def make_sampler(name: Sampler, seed: int):
    import optuna

    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed),
        "gp": lambda: optuna.samplers.GPSampler(seed=seed),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
    }
    return samplers[name]()


def _code_version() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def find_trial_run(
    client: mlflow.MlflowClient, experiment_id: str, parent_run_id: str, trial_id: str
) -> str | None:
    """The MLflow run a Ray trial already has (after a restart or a resumed search), if any."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.ray_trial_id = '{trial_id}'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def trial_dirname(trial) -> str:
    """A trial's folder under the search's: its id. Ray's default name lists every setting."""
    return f"trial_{trial.trial_id}"


def run_trial(trial_params: dict[str, Any], *, data=None, tracking: dict[str, str]) -> None:
    """The Ray Tune function trainable: one trial, its own MLflow child run, resumable."""
    import ray
    from ray import tune

    context = tune.get_context()
    trial_id = context.get_trial_id()
    config = TrialConfig.from_dict(trial_params)
    mlflow.set_tracking_uri(tracking["uri"])
    client = mlflow.MlflowClient(tracking["uri"])
    run_id = find_trial_run(client, tracking["experiment_id"], tracking["parent_run_id"], trial_id)
    if run_id is None:  # a retried or resumed trial keeps its run
        run_id = client.create_run(
            tracking["experiment_id"],
            tags={
                "mlflow.parentRunId": tracking["parent_run_id"],
                "ray_trial_id": trial_id,
                "sora_tune.role": "trial",
                "mlflow.runName": context.get_trial_name(),
            },
        ).info.run_id

    client.set_tag(run_id, "ray_node_id", ray.get_runtime_context().get_node_id())

    def report(metrics: dict[str, Any], checkpoint_dir: str) -> None:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir))

    checkpoint = tune.get_checkpoint()
    # Not in the trial's Ray folder, which Ray copies to the storage path while trials write:
    # what lasts is reported as checkpoints and logged to MLflow.
    with (
        tempfile.TemporaryDirectory(prefix=f"sora-trial-{trial_id}-") as output_dir,
        checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as resume_from,
    ):
        result = tracked_trial(
            config,
            run_id=run_id,
            output_dir=output_dir,
            report=report,
            data=data,
            resume_from=resume_from,
        )
    if result["status"] != "finished":
        # NaN objectives make Optuna record the trial as failed; the search goes on.
        tune.report(
            {"val_score": math.nan, "retained_params": math.nan, "status": result["status"]}
        )


def run_search(config: SearchConfig, *, resume: str | os.PathLike | None = None):
    """Run (or, with `resume`, finish) a search; returns Ray's `ResultGrid`.

    Raises:
        ValueError: bad settings or storage unsuitable for the cluster.
        ConnectionError: the MLflow server does not answer (before any trial starts).
    """
    import ray
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    # Everything that can be wrong with the input fails here, before Ray starts: the MLflow
    # server, the fixed settings (task, model path, ...), the data folder and its TSV files.
    check_tracking_uri(config.mlflow_uri)
    check_no_password("--storage-path", config.storage_path)
    space = config.space
    fixed_trial = TrialConfig.from_dict(space.fixed)  # validates the fixed part once more
    # Tokenise once and share through Ray's object store, unless a data setting is searched.
    data = None
    if not set(DATA_KEYS) & set(space.distributions):
        data = in_memory(prepare_data(fixed_trial, load_tokenizer(fixed_trial)))
    else:  # each trial prepares its own data: read every task's files once, to check them
        for task, data_dir in _data_sources(space):
            load_glue(task, data_dir)

    if not ray.is_initialized():
        ray.init(address=config.address, log_to_driver=True)
    check_storage(config.storage_path)

    mlflow.set_tracking_uri(config.mlflow_uri)
    experiment = mlflow.set_experiment(config.experiment_name)
    if resume is not None:
        parent_run_id = read_search_state(resume)["parent_run_id"]
    else:
        parent_run_id = start_parent_run(config, experiment.experiment_id)
    tracking = {
        "uri": config.mlflow_uri,
        "experiment_id": experiment.experiment_id,
        "parent_run_id": parent_run_id,
    }

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, data=data, tracking=tracking),
        {"cpu": config.cpus_per_trial, "gpu": config.gpus_per_trial},
    )

    if resume is not None:
        tuner = tune.Tuner.restore(
            str(resume), trainable=trainable, resume_errored=False, restart_errored=False
        )
    else:
        metrics = list(OBJECTIVES) if config.objective == "multi" else ["val_score"]
        searcher = OptunaSearch(
            metric=metrics if len(metrics) > 1 else metrics[0],
            mode=[OBJECTIVES[m] for m in metrics] if len(metrics) > 1 else "max",
            sampler=make_sampler(config.sampler, config.seed),
            points_to_evaluate=space.points_to_evaluate or None,
        )
        if config.max_concurrent:
            searcher = ConcurrencyLimiter(searcher, max_concurrent=config.max_concurrent)
        scheduler = None
        if config.asha:
            scheduler = tune.schedulers.ASHAScheduler(
                metric="val_score",
                mode="max",
                time_attr="training_iteration",
                max_t=fixed_trial.epochs,
                grace_period=1,
            )
        tuner = tune.Tuner(
            trainable,
            param_space=space.to_tune(),
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                scheduler=scheduler,
                num_samples=config.num_samples,
                reuse_actors=True,
                trial_dirname_creator=trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=config.name,
                storage_path=config.storage_path,
                failure_config=tune.FailureConfig(max_failures=config.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            ),
        )
        write_search_state(
            f"{config.storage_path}/{config.name}",
            {"parent_run_id": parent_run_id, "config": _search_params(config)},
        )

    results = tuner.fit()
    client = mlflow.MlflowClient(config.mlflow_uri)
    close_open_runs(client, experiment.experiment_id, parent_run_id, results)
    client.set_terminated(parent_run_id)
    return results


def close_open_runs(
    client: mlflow.MlflowClient, experiment_id: str, parent_run_id: str, results
) -> None:
    """End the trial runs still RUNNING once the search is over, so each trial has one run.

    A trial Ray knows ends its run itself unless its worker died for good: its run ends FAILED.
    Any other open run belongs to a trial that a killed driver had started but not yet saved in
    its experiment state; the resumed search ran that work again as another trial, so the orphan
    is deleted (MLflow keeps deleted runs restorable).
    """
    # A trial's folder name carries its id, also for trials that errored before any report.
    folders = [Path(result.path).name for result in results]
    open_runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'RUNNING'",
    )
    for run in open_runs:
        trial_id = run.data.tags.get("ray_trial_id", "")
        known = bool(trial_id) and any(trial_id in folder for folder in folders)
        reason = "worker lost, trial did not finish" if known else "orphaned by a killed driver"
        client.set_tag(run.info.run_id, "failure_reason", reason)
        client.set_terminated(run.info.run_id, status="FAILED" if known else "KILLED")
        if not known:
            client.delete_run(run.info.run_id)


def _data_sources(space: SearchSpace) -> set[tuple[str, str | None]]:
    """Every (task, data_dir) pair the trials of `space` can use."""

    def values(name: str) -> list[Any]:
        if name in space.distributions:
            return space.distributions[name].get("values", [])
        return [space.fixed.get(name, getattr(TrialConfig, name))]

    return {(task, data_dir) for task in values("task") for data_dir in values("data_dir")}


def in_memory(data: DatasetDict) -> DatasetDict:
    """A copy held in memory: a dataset loaded from the disk cache pickles as a file reference,
    which a worker on another machine could not open."""
    return DatasetDict(
        {
            name: Dataset.from_dict(split.to_dict(), features=split.features)
            for name, split in data.items()
        }
    )


def _search_params(config: SearchConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)  # nested: the space is a dict too


def resume_search(path: str | os.PathLike, *, address: str | None = None):
    """Finish an interrupted search from its Ray experiment folder: finished trials are not run
    again and every trial keeps its MLflow run.

    Raises:
        FileNotFoundError: `path` is not the folder of a sora-tune search.
    """
    values = read_search_state(path)["config"]
    values["space"] = SearchSpace(**values["space"])
    values["address"] = address or values["address"]
    return run_search(SearchConfig(**values), resume=path)


def _state_file(folder: str | os.PathLike) -> tuple[pyarrow.fs.FileSystem, str]:
    """The file system and path of a search's state file, through pyarrow as Ray resolves its
    storage: a local or NFS folder, or a URI such as s3://bucket/path or gs://bucket/path."""
    import pyarrow.fs

    folder = str(folder)
    if "://" not in folder:
        folder = os.path.abspath(folder)
    filesystem, path = pyarrow.fs.FileSystem.from_uri(folder)
    return filesystem, f"{path.rstrip('/')}/{SEARCH_STATE_FILE}"


def write_search_state(folder: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write the state `--resume` needs into the search's Ray folder, whole or not at all."""
    filesystem, path = _state_file(folder)
    filesystem.create_dir(path.rpartition("/")[0], recursive=True)
    staged = f"{path}.tmp"
    with filesystem.open_output_stream(staged) as stream:
        stream.write(json.dumps(state, indent=1).encode())
    filesystem.move(staged, path)


def read_search_state(folder: str | os.PathLike) -> dict[str, Any]:
    """The state `write_search_state` wrote.

    Raises:
        FileNotFoundError: `folder` is not the folder of a sora-tune search.
    """
    import pyarrow.fs

    filesystem, path = _state_file(folder)
    if filesystem.get_file_info(path).type != pyarrow.fs.FileType.File:
        raise FileNotFoundError(
            f"{folder} is not a sora-tune search folder (no {SEARCH_STATE_FILE})"
        )
    with filesystem.open_input_stream(path) as stream:
        return json.loads(stream.read())


def start_parent_run(config: SearchConfig, experiment_id: str) -> str:
    """The search's parent run: the space, sampler, sample count, code version and resources."""
    import ray

    client = mlflow.MlflowClient(config.mlflow_uri)
    run = client.create_run(
        experiment_id,
        run_name=config.name,
        tags={"sora_tune.role": "search", "ray_experiment": config.name},
    )
    params = {
        "sampler": config.sampler,
        "num_samples": config.num_samples,
        "objective": config.objective,
        "cpus_per_trial": config.cpus_per_trial,
        "gpus_per_trial": config.gpus_per_trial,
        "code_version": _code_version(),
        "cluster_resources": json.dumps(ray.cluster_resources()),
        "ray_storage": redact_uri(f"{config.storage_path}/{config.name}"),
    }
    for key, value in params.items():
        client.log_param(run.info.run_id, key, str(value))
    client.log_dict(run.info.run_id, dataclasses.asdict(config.space), "search_space.json")
    return run.info.run_id


def check_storage(storage_path: str) -> None:
    """On a cluster with nodes on other machines, a local `storage_path` must be shared.

    Raises:
        ValueError: several machines, and a local path on no network file system.
    """
    import ray

    if "://" in storage_path:
        return
    addresses = {node["NodeManagerAddress"] for node in ray.nodes() if node.get("Alive")}
    if len(addresses) <= 1 or _is_network_filesystem(storage_path):
        return
    raise ValueError(
        f"storage_path {storage_path} is a local folder, but the cluster spans {len(addresses)} "
        "machines: use shared storage (an NFS mount, s3://bucket/path or gs://bucket/path)"
    )


def _is_network_filesystem(path: str) -> bool:
    network = {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "lustre",
        "gpfs",
        "beegfs",
        "fuse.sshfs",
        "ceph",
        "glusterfs",
    }
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return False
    path = os.path.realpath(path)
    best = max((m for m in mounts if path.startswith(m[1])), key=lambda m: len(m[1]), default=None)
    return best is not None and best[2] in network
