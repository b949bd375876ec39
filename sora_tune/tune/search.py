"""The distributed search: Ray Tune runs `train_trial` on every worker, Optuna proposes the
settings, MLflow keeps one parent run per search and one child run per trial.

Optuna receives each trial's last-epoch `val_score` and `retained_params`: the values of the
adapter the trial exports, so what the search optimises is what you can ship. A trial that a
scheduler stops early is PRUNED for Optuna and left off the front (see `outcome`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import mlflow
from datasets import Dataset, DatasetDict

from .. import __version__
from ..config import DATA_FIELDS, TrialConfig
from ..data import load_glue
from ..tracking import ROLE_TAG, experiment_id_of
from ..train import load_tokenizer, prepare_data
from ..uris import (
    check_no_password,
    check_tracking_uri,
    default_tracking_uri,
    local_store_path,
    redact_uri,
    resolve_tracking_uri,
)
from .cluster import (
    check_client_storage,
    check_paths_on_nodes,
    check_storage,
    check_tracking_for_cluster,
)
from .outcome import StoppedAsPrunedOptunaSearch, TrialRecorder, close_open_runs
from .space import SearchSpace
from .state import read_search_state, write_search_state
from .trial import run_trial, trial_dirname

Sampler = Literal["tpe", "nsga2", "gp", "random"]
SAMPLERS = ("tpe", "nsga2", "gp", "random")
OBJECTIVES = {"val_score": "max", "retained_params": "min"}


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
        cpus_per_trial, gpus_per_trial: Resources of one trial. A trial is one process on one
            device: at most 1 GPU, and fractions let several small trials share one.
        address: `None` starts a local Ray; `auto` or `ray://host:port` joins a cluster.
        storage_path: Where Ray keeps the experiment state; shared storage (NFS, s3://, gs://)
            for several nodes, a URI with `ray://`.
        name: The Ray experiment name (a folder under `storage_path`).
        mlflow_uri: MLflow tracking URI; by default `MLFLOW_TRACKING_URI`, else a local sqlite
            file. A relative local store
            (`sqlite:///mlflow.db`, `file:mlruns`) is taken from the current folder. A cluster
            needs a server that serves artifacts.
        experiment_name: MLflow experiment.
        seed: Seeds the sampler.
        max_failures: Retries of a trial that crashed (a node lost, an exception).
        optuna_storage: Where Optuna keeps the study, named after the search (`name`), so
            `optuna-dashboard` and `optuna.load_study` read it: an RDB URL. `None`: a sqlite
            file `optuna.db` beside a local MLflow store, else in memory (Ray still saves the
            sampler's state for `--resume`).
    """

    space: SearchSpace
    num_samples: int = 8  # trials
    sampler: Sampler = "tpe"
    objective: Literal["multi", "val_score"] = "multi"
    asha: bool = False  # early stopping, single objective only
    max_concurrent: int | None = None  # None: as many as fit
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0  # at most 1; fractions share a GPU
    address: str | None = None  # None: local Ray
    storage_path: str | None = None  # None: ./ray_results
    name: str | None = None  # None: "<experiment_name>-<timestamp>"
    mlflow_uri: str = dataclasses.field(default_factory=default_tracking_uri)
    experiment_name: str = "sora-tune"
    seed: int = 0
    max_failures: int = 1  # retries of a crashed trial
    optuna_storage: str | None = None  # None: ./optuna.db beside a local MLflow store

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
        if self.gpus_per_trial > 1:
            raise ValueError(
                f"gpus_per_trial must be at most 1, got {self.gpus_per_trial:g}: a trial is one "
                "process on one device (fractions such as 0.5 let trials share a GPU); run more "
                "trials at once instead"
            )
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {self.max_concurrent}")
        check_client_storage(self.address, self.storage_path)
        # Paths are taken from the user's folder here, on the driver: Ray starts every trial in
        # a folder of its own.
        if self.storage_path is None or "://" not in self.storage_path:
            self.storage_path = os.path.abspath(self.storage_path or "ray_results")
        self.mlflow_uri = resolve_tracking_uri(self.mlflow_uri)
        check_tracking_for_cluster(self.mlflow_uri, nodes=1, address=self.address)
        store = local_store_path(self.mlflow_uri)
        if self.optuna_storage is None and store is not None:
            self.optuna_storage = f"sqlite:///{store.parent / 'optuna.db'}"
        elif self.optuna_storage is not None:
            self.optuna_storage = resolve_tracking_uri(self.optuna_storage)
        self.space = self.space.with_resolved_paths()
        self.name = self.name or f"{self.experiment_name}-{time.strftime('%Y%m%d-%H%M%S')}"

    @property
    def path(self) -> str:
        """The search's Ray folder: what `--resume` takes."""
        return f"{self.storage_path}/{self.name}"


@dataclass
class SearchResult:
    """A finished (or interrupted) search.

    Attributes:
        results: Ray's `ResultGrid`, one result per trial.
        config: The search's settings.
        experiment_id: The MLflow experiment of its runs.
        parent_run_id: Its MLflow parent run.
        interrupted: The signal that stopped it (`SIGINT`, `SIGTERM`), or `None`.
        interrupted_trials: Ids of the trials in flight when it was interrupted.
    """

    results: Any
    config: SearchConfig
    experiment_id: str
    parent_run_id: str
    interrupted: str | None = None
    interrupted_trials: list[str] = dataclasses.field(default_factory=list)


def make_sampler(name: Sampler, seed: int):
    import optuna

    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed),
        "gp": lambda: optuna.samplers.GPSampler(seed=seed),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
    }
    return samplers[name]()


def optuna_storage(url: str | None):
    """Optuna's storage for a study at `url` (an RDB URL such as sqlite:///optuna.db), or `None`
    for an in-memory study."""
    if url is None:
        return None
    import optuna

    return optuna.storages.RDBStorage(url)


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


def run_search(config: SearchConfig, *, resume: str | os.PathLike | None = None) -> SearchResult:
    """Run (or, with `resume`, finish) a search.

    SIGINT (Ctrl-C) and SIGTERM stop it gracefully: no new trials, the trials in flight end
    their MLflow runs KILLED ("search interrupted") and the parent run too, and `resume`
    (`sora-tune search --resume <path>`) continues them in the same runs. A second signal stops
    at once.

    Raises:
        ValueError: bad settings, or storage, tracking or files the cluster's nodes cannot use.
        ConnectionError: the MLflow server does not answer (before any trial starts).
    """
    import ray

    data = _check_inputs(config)
    if not ray.is_initialized():
        ray.init(address=config.address, log_to_driver=True)
    _check_cluster(config, shares_data=data is not None)

    client = mlflow.MlflowClient(config.mlflow_uri)
    experiment = client.get_experiment(experiment_id_of(client, config.experiment_name))
    nodes = sum(node.get("Alive", False) for node in ray.nodes())
    check_tracking_for_cluster(
        config.mlflow_uri,
        nodes=nodes,
        address=config.address,
        artifact_location=experiment.artifact_location,
    )
    if resume is not None:
        parent_run_id = read_search_state(resume)["parent_run_id"]
        client.update_run(parent_run_id, status="RUNNING")
    else:
        parent_run_id = start_parent_run(config, experiment.experiment_id)
    tracking = {
        "uri": config.mlflow_uri,
        "experiment_id": experiment.experiment_id,
        "parent_run_id": parent_run_id,
    }
    with stop_gracefully_on_signals() as received:
        try:
            results = _make_tuner(config, tracking, data, resume).fit()
        except KeyboardInterrupt:  # a second signal, or one before Ray Tune started
            client.set_terminated(parent_run_id, status="KILLED")
            raise
        except Exception:
            client.set_terminated(parent_run_id, status="FAILED")
            raise
    return _end_search(config, client, tracking, results, received[0] if received else None)


def _check_inputs(config: SearchConfig) -> DatasetDict | None:
    """Everything that can be wrong with the input fails here, before Ray starts: the MLflow
    server, the fixed settings (task, model path, ...), the data folder and its TSV files.
    Returns the tokenised data to share with every trial, or `None` when a data setting is
    searched (each trial then prepares its own)."""
    check_tracking_uri(config.mlflow_uri)
    check_no_password("--storage-path", config.storage_path)
    if config.optuna_storage is not None:
        check_no_password("--optuna-storage", config.optuna_storage)
    space = config.space
    fixed_trial = TrialConfig.from_dict(space.fixed)  # validates the fixed part once more
    if not set(DATA_FIELDS) & set(space.distributions):
        return in_memory(prepare_data(fixed_trial, load_tokenizer(fixed_trial)))
    for task in space.values("task"):  # read every task's files once, to check them
        for data_dir in space.values("data_dir"):
            load_glue(task, data_dir)
    return None


def _check_cluster(config: SearchConfig, *, shares_data: bool) -> None:
    """On a cluster: shared storage, and the model (and data) folders on every node."""
    import ray

    check_storage(config.storage_path)
    nodes = sum(node.get("Alive", False) for node in ray.nodes())
    if nodes <= 1 and not config.address:
        return
    settings = ["model"] + ([] if shares_data else ["data_dir"])
    check_paths_on_nodes(
        {
            name: [v for v in config.space.values(name) if v and os.path.isabs(v)]
            for name in settings
        }
    )


def _make_tuner(config: SearchConfig, tracking: dict[str, str], data, resume):
    """The Tuner of a new search, or the restored one of an interrupted search."""
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, data=data, tracking=tracking),
        {"cpu": config.cpus_per_trial, "gpu": config.gpus_per_trial},
    )
    if resume is not None:
        return tune.Tuner.restore(
            str(resume), trainable=trainable, resume_errored=False, restart_errored=False
        )
    space = config.space
    metrics = list(OBJECTIVES) if config.objective == "multi" else ["val_score"]
    searcher = StoppedAsPrunedOptunaSearch(
        metric=metrics if len(metrics) > 1 else metrics[0],
        mode=[OBJECTIVES[m] for m in metrics] if len(metrics) > 1 else "max",
        sampler=make_sampler(config.sampler, config.seed),
        points_to_evaluate=space.points_to_evaluate or None,
        study_name=config.name,
        storage=optuna_storage(config.optuna_storage),
    )
    if config.max_concurrent:
        searcher = ConcurrencyLimiter(searcher, max_concurrent=config.max_concurrent)
    scheduler = None
    if config.asha:
        scheduler = tune.schedulers.ASHAScheduler(
            metric="val_score",
            mode="max",
            time_attr="training_iteration",
            max_t=TrialConfig.from_dict(space.fixed).epochs,
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
            callbacks=[TrialRecorder(tracking)],
        ),
    )
    write_search_state(
        config.path,
        {"parent_run_id": tracking["parent_run_id"], "config": dataclasses.asdict(config)},
    )
    return tuner


def _end_search(
    config: SearchConfig,
    client: mlflow.MlflowClient,
    tracking: dict[str, str],
    results,
    interrupted: str | None,
) -> SearchResult:
    """End the runs Ray left open and the parent run: FINISHED, or KILLED when interrupted."""
    parent_run_id = tracking["parent_run_id"]
    closed = close_open_runs(
        client,
        tracking["experiment_id"],
        parent_run_id,
        results,
        interrupted=interrupted is not None,
    )
    if interrupted:
        client.set_tag(parent_run_id, "sora_tune.interrupted_by", interrupted)
    client.set_terminated(parent_run_id, status="KILLED" if interrupted else "FINISHED")
    return SearchResult(
        results=results,
        config=config,
        experiment_id=tracking["experiment_id"],
        parent_run_id=parent_run_id,
        interrupted=interrupted,
        interrupted_trials=closed if interrupted else [],
    )


@contextlib.contextmanager
def stop_gracefully_on_signals() -> Iterator[list[str]]:
    """While a search runs, SIGINT and SIGTERM stop it as Ray Tune stops on SIGINT (the loop
    ends, the experiment state is saved for a resume); yields the list of signals received.

    Ray Tune handles only SIGINT (and SIGUSR1), and only on the main thread: here both signals
    call its handler, which it installs for SIGUSR1 when `fit` starts. Before that, or on a
    second signal, they raise `KeyboardInterrupt`. Off the main thread, signals stay Python's.
    """
    received: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handle(signum: int, frame) -> None:
        first = not received
        received.append(signal.Signals(signum).name)
        tune_handler = signal.getsignal(signal.SIGUSR1)
        if not first or not callable(tune_handler):
            raise KeyboardInterrupt
        tune_handler(signum, frame)

    watched = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
    previous = {s: signal.getsignal(s) for s in watched}
    variable = "TUNE_DISABLE_SIGINT_HANDLER"  # Tune's own SIGINT handler would replace ours
    previous_variable = os.environ.get(variable)
    os.environ[variable] = "1"
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)  # not a handler of an earlier search
    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    try:
        yield received
    finally:
        for watched_signal, handler in previous.items():
            signal.signal(watched_signal, handler)
        if previous_variable is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = previous_variable


def in_memory(data: DatasetDict) -> DatasetDict:
    """The splits as in-memory Arrow tables: a dataset loaded from the disk cache pickles as a
    file reference, which a worker on another machine could not open. The rows stay in Arrow
    (a `take` of the selected rows), never Python objects."""
    return DatasetDict(
        {
            name: Dataset(split.with_format("arrow")[:], info=split.info, split=split.split)
            for name, split in data.items()
        }
    )


def resume_search(path: str | os.PathLike, *, address: str | None = None) -> SearchResult:
    """Finish an interrupted search from its Ray experiment folder: finished trials are not run
    again and every trial keeps its MLflow run. Every setting comes from the search itself; only
    `address` (where Ray runs) may differ.

    Raises:
        FileNotFoundError: `path` is not the folder of a sora-tune search.
    """
    path = str(path) if "://" in str(path) else os.path.abspath(path)  # from the user's folder
    values = read_search_state(path)["config"]
    values["space"] = SearchSpace(**values["space"])
    values["address"] = address or values["address"]
    return run_search(SearchConfig(**values), resume=path)


def start_parent_run(config: SearchConfig, experiment_id: str) -> str:
    """The search's parent run: the space, sampler, sample count, code version and resources."""
    import ray

    client = mlflow.MlflowClient(config.mlflow_uri)
    run = client.create_run(
        experiment_id,
        run_name=config.name,
        tags={ROLE_TAG: "search", "ray_experiment": config.name},
    )
    params = {
        "sampler": config.sampler,
        "num_samples": config.num_samples,
        "objective": config.objective,
        "cpus_per_trial": config.cpus_per_trial,
        "gpus_per_trial": config.gpus_per_trial,
        "code_version": _code_version(),
        "cluster_resources": json.dumps(ray.cluster_resources()),
        "ray_storage": redact_uri(config.path),
    }
    for key, value in params.items():
        client.log_param(run.info.run_id, key, str(value))
    client.log_dict(run.info.run_id, dataclasses.asdict(config.space), "search_space.json")
    return run.info.run_id
