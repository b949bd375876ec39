"""The distributed search: Ray Tune runs `train_trial` on every worker, Optuna proposes the
settings, MLflow keeps one parent run per search and one child run per trial.

Optuna receives each trial's last-epoch `val_score` and `retained_params`: the values of the
adapter the trial exports, so what the search optimises is what you can ship (a front-tracing
trial: the one of its stage points that moves the search's front the most). A trial that a
scheduler stops early, or that pruned every rank, is PRUNED for Optuna and left off the front
(see `outcome`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import signal
import subprocess
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from datasets import Dataset, DatasetDict

from .. import __version__
from ..config import DATA_FIELDS, FILE_FIELDS, TrialConfig
from ..data import DataSource, load_glue
from ..front import OBJECTIVES
from ..memory import format_bytes
from ..models import check_targets, load_tokenizer
from ..quiet import QUIET_ENV, quiet_search_driver
from ..tracking import ROLE_TAG, experiment_id_of
from ..train import data_lineage, own_data, prepare_data
from ..uris import (
    check_database_driver,
    check_no_password,
    check_tracking_uri,
    local_store_path,
    redact_uri,
)
from .baselines import LORA_LADDER, BaselinesFirst, ladder_trials
from .cluster import (
    check_paths_on_nodes,
    check_storage,
    check_tracking_for_cluster,
)
from .config import AUTO, Sampler, SearchConfig
from .outcome import RAY_MODES, StoppedAsPrunedOptunaSearch, TrialRecorder, close_open_runs
from .resources import (
    GpuRequest,
    check_trials_fit,
    cluster_gpu_bytes,
    gpu_share,
    trial_resources,
)
from .schedulers import ParetoSuccessiveHalving
from .space import SearchSpace
from .state import SEARCH_STATE_FILE, read_json, read_search_state, write_search_state
from .trial import WORKERS_PARAM, run_trial, trial_dirname
from .workers import (
    DRIVER_RESOURCES,
    FORCE_CLEANUP_ENV,
    STOPPED_TRIAL_SECONDS,
    WorkerGroup,
    check_stops_free_workers,
)


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


def tpe_startup_trials(num_samples: int) -> int:
    """TPE's random start-up trials for a search of `num_samples`: a fifth of them, 4 to 10.
    Optuna's fixed 10 suits hundreds of trials; in a 16-trial search it leaves TPE 6."""
    return min(10, max(4, round(num_samples / 5)))


def nsga2_population(num_samples: int) -> int:
    """NSGA-II's population for a search of `num_samples`: a quarter of them, 4 to 50. Optuna's
    fixed 50 suits thousands of trials; in an 8-32 trial search the whole search would be its
    random first generation. A quarter gives four generations, the first one random."""
    return min(50, max(4, num_samples // 4))


def make_sampler(name: Sampler, seed: int, *, num_samples: int, tpe_startup: int | None = None):
    """The Optuna sampler `name`, sized to a search of `num_samples`. TPE models the parameters
    jointly (`multivariate`) and, with trials running side by side, counts the running ones as
    their worst (`constant_liar`), so concurrent trials do not all go to the same place; its
    first `tpe_startup` trials (default `tpe_startup_trials(num_samples)`) are random. NSGA-II's
    population is `nsga2_population(num_samples)`."""
    import optuna

    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(
            seed=seed,
            n_startup_trials=tpe_startup or tpe_startup_trials(num_samples),
            multivariate=True,
            constant_liar=True,
        ),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(
            seed=seed, population_size=nsga2_population(num_samples)
        ),
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

    # GPU shares are checked before the data are read when the GPU memory is known (from the
    # models' configurations, in seconds), else once Ray runs and its GPUs can be asked.
    sized_now = config.gpus_per_trial != AUTO or config.gpu_memory is not None
    gpus = gpu_request(config) if sized_now else None
    data = _check_inputs(config, new=resume is None)
    # Shared data come with their sources, hashed on the driver (the digests of the files just
    # read); otherwise every trial reads its own.
    representative = TrialConfig.from_dict(config.space.representative())
    sources = data_lineage(representative) if data is not None else None
    if data is not None:
        print(data_summary(sources, data), flush=True)
    if not ray.is_initialized():
        # Trials' library chatter would flood the driver's terminal through Ray's log stream;
        # errors still reach it, and every trial's full log stays in Ray's session folder.
        ray.init(address=config.address, runtime_env={"env_vars": QUIET_ENV})
    if not sized_now:
        gpus = gpu_request(config)
    _check_cluster(config, gpus, shares_data=data is not None)

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
    quiet_search_driver()
    with stop_gracefully_on_signals() as received:
        try:
            results = _make_tuner(config, tracking, data, sources, resume, gpus).fit()
        except KeyboardInterrupt:  # a second signal, or one before Ray Tune started
            client.set_terminated(parent_run_id, status="KILLED")
            raise
        except Exception:
            client.set_terminated(parent_run_id, status="FAILED")
            raise
    return _end_search(config, client, tracking, results, received[0] if received else None)


def data_summary(sources: Sequence[DataSource], data: DatasetDict) -> str:
    """The rows read from each file (or dataset split) and the rows of each split the trials
    use: what a user checks first when a score looks wrong."""
    read = ", ".join(
        f"{source.name} ({source.split}"
        + (f", {source.num_rows:,} rows read)" if source.num_rows is not None else ")")
        for source in sources
    )
    splits = ", ".join(
        f"{name} {len(data[name]):,}" for name in ("train", "val", "test") if name in data
    )
    return f"data: {read}; rows per split: {splits}"


def _check_new_name(config: SearchConfig) -> None:
    """A new search does not take an earlier one's name: Ray would write into its folder, and
    Optuna would load its study (Ray's OptunaSearch loads a study of the same name), so that the
    sampler would learn from the other search's trials.

    Raises:
        ValueError: naming the search, and how to go on.
    """
    if read_json(config.path, SEARCH_STATE_FILE, missing_ok=True) is not None:
        raise ValueError(
            f"a search named {config.name!r} already ran in {config.storage_path}: give "
            f"another --name, or finish it if it was interrupted (--resume {config.path})"
        )
    if config.optuna_storage is None:  # an in-memory study: new
        return
    store = local_store_path(config.optuna_storage)
    if store is not None and not store.exists():  # no study yet; asking would create the file
        return
    import optuna

    if config.name in optuna.get_all_study_names(optuna_storage(config.optuna_storage)):
        raise ValueError(
            f"{config.optuna_storage} already holds an Optuna study named {config.name!r}: "
            "give another --name, or delete that study (optuna delete-study)"
        )


def _check_inputs(config: SearchConfig, *, new: bool) -> DatasetDict | None:
    """Everything that can be wrong with the input fails here, before Ray starts: the MLflow
    server, the storage (and, for a `new` search, its name), the fixed settings (task, model
    path, ...), the data folder and its TSV files. Returns the tokenised data to share with every
    trial, or `None` when a data setting is searched (each trial then prepares its own)."""
    check_tracking_uri(config.mlflow_uri)
    check_no_password("--storage-path", config.storage_path)
    if config.optuna_storage is not None:
        check_no_password("--optuna-storage", config.optuna_storage)
        check_database_driver("--optuna-storage", config.optuna_storage)
    if new:
        _check_new_name(config)
    space = config.space
    if not space.distributions:
        raise ValueError(
            "the search space searches nothing (every parameter is fixed): give at least one a "
            "distribution, or train the one trial with sora-tune train"
        )
    # One trial of the space: the data it prepares are every trial's (no data setting is searched)
    fixed_trial = TrialConfig.from_dict(space.representative())
    if config.baseline == LORA_LADDER:
        for values in ladder_trials(space, config.baseline_seeds):
            TrialConfig.from_dict(values)  # a ladder trial that cannot run fails here
    for model in space.values("model"):  # every backbone takes every target_modules choice
        for targets in space.values("target_modules"):
            check_targets(dataclasses.replace(fixed_trial, model=model, target_modules=targets))
    if not set(DATA_FIELDS) & set(space.distributions):
        return in_memory(prepare_data(fixed_trial, load_tokenizer(fixed_trial)))
    if fixed_trial.own_data:  # one candidate's data, read and checked; each trial reads its own
        own_data(fixed_trial)
        return None
    for task in space.values("task"):  # read every task's files once, to check them
        for data_dir in space.values("data_dir"):
            load_glue(task, data_dir)
    return None


def _check_cluster(config: SearchConfig, gpus: GpuRequest | None, *, shares_data: bool) -> None:
    """On a cluster: shared storage, and the model (and data) folders on every node; trials of
    several workers that it holds, given GPUs as `gpus` says."""
    import ray

    check_storage(config.storage_path)
    workers = WorkerGroup.of(config, gpus)
    if workers:  # before any run is recorded: a trial that fits no cluster would never start
        workers.trials_at_once(ray.cluster_resources(), config.max_concurrent)
        if config.asha or config.early_stop != "none":
            check_stops_free_workers()
    nodes = sum(node.get("Alive", False) for node in ray.nodes())
    if nodes <= 1 and not config.address:
        return
    # Shared data reach the trials through Ray: then only the driver reads the data files.
    settings = ["model"] + ([] if shares_data else [*FILE_FIELDS, "dataset", "data_dir"])
    check_paths_on_nodes(
        {
            name: [v for v in config.space.values(name) if v and os.path.isabs(v)]
            for name in settings
        }
    )


def gpu_request(config: SearchConfig) -> GpuRequest | None:
    """How the search's trials get GPUs (`None`: they get none), checked against the GPU memory:
    with `auto`, the cluster's smallest GPU (`--gpu-memory`, else asked of the GPUs) must hold
    every trial of the space; with a share and `--gpu-memory`, the share must.

    Raises:
        ValueError: a trial of the space that does not fit, or GPU memory that cannot be known.
    """
    if config.gpus_per_trial == 0:
        return None
    gpu_bytes, workers = config.gpu_bytes, config.workers_per_trial
    if config.gpus_per_trial == AUTO:
        gpu_bytes = gpu_bytes or cluster_gpu_bytes()
        largest = check_trials_fit(
            config.space, gpu_bytes, f"the {format_bytes(gpu_bytes)} of the smallest GPU", workers
        )
        process = "trial's" if workers == 1 else f"worker's (of {workers} a trial)"
        print(
            f"GPU shares: each {process} estimate in eighths of {format_bytes(gpu_bytes)}; the "
            f"space's largest needs {format_bytes(largest)} "
            f"({gpu_share(largest, gpu_bytes):g} of a GPU)",
            flush=True,
        )
    elif gpu_bytes is not None:
        share = config.gpus_per_trial
        check_trials_fit(
            config.space,
            int(share * gpu_bytes),
            f"its {share:g} share of a {format_bytes(gpu_bytes)} GPU (try --gpus-per-trial auto)",
            workers,
        )
    return GpuRequest(gpus_per_trial=config.gpus_per_trial, gpu_bytes=gpu_bytes, workers=workers)


def _make_tuner(
    config: SearchConfig,
    tracking: dict[str, str],
    data,
    sources,
    resume,
    gpus: GpuRequest | None,
):
    """The Tuner of a new search, or the restored one of an interrupted search."""
    import ray
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    workers = WorkerGroup.of(config, gpus)  # `None`: a trial is one process
    if workers:
        # A trial that a scheduler stops waits in its Train run's `fit`, which nothing ends but
        # the end of its actor (its workers go with it): Tune kills such an actor after this
        # many seconds, by default 600, while the workers hold their CPUs and GPUs.
        os.environ.setdefault(FORCE_CLEANUP_ENV, str(STOPPED_TRIAL_SECONDS))
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial, data=data, sources=sources, tracking=tracking, gpus=gpus, workers=workers
        ),
        # A trial of several workers only drives them; else each trial's own request: with
        # gpus_per_trial auto, its share of a GPU.
        DRIVER_RESOURCES
        if workers
        else functools.partial(trial_resources, cpus=config.cpus_per_trial, gpus=gpus),
    )
    if resume is not None:
        return tune.Tuner.restore(
            str(resume), trainable=trainable, resume_errored=False, restart_errored=False
        )
    space = config.space
    searcher = StoppedAsPrunedOptunaSearch(
        config.directions,
        sampler=make_sampler(
            config.sampler,
            config.sampler_seed,
            num_samples=config.num_samples,
            tpe_startup=config.tpe_startup_trials,
        ),
        points_to_evaluate=space.points_to_evaluate or None,
        study_name=config.name,
        storage=optuna_storage(config.optuna_storage),
    )
    baselines = (
        ladder_trials(space, config.baseline_seeds) if config.baseline == LORA_LADDER else []
    )
    if baselines:
        searcher = BaselinesFirst(searcher, baselines)
    max_concurrent = config.max_concurrent
    if workers:
        max_concurrent = workers.trials_at_once(ray.cluster_resources(), max_concurrent)
    if max_concurrent:
        searcher = ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)
    scheduler = None
    max_epochs = space.largest("epochs")  # trials may differ in budget: rungs go up to the most
    if config.early_stop == "pareto":
        scheduler = ParetoSuccessiveHalving(
            config.directions,
            max_epochs=max_epochs,
            grace_period=config.grace_period,
            reduction_factor=config.reduction_factor or 3,  # syne-tune's MO-ASHA default
            state_folder=config.path,
        )
    elif config.asha:
        scheduler = tune.schedulers.ASHAScheduler(
            metric="val_score",
            mode=RAY_MODES[OBJECTIVES["val_score"]],
            # Epochs trained, fractional with eval_steps: a count of reports would not be epochs.
            time_attr="epoch",
            max_t=max_epochs,
            grace_period=config.grace_period,
            reduction_factor=config.reduction_factor or 4,  # Ray's default
        )
    tuner = tune.Tuner(
        trainable,
        param_space=space.to_tune(),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=config.num_samples + len(baselines),
            # Not for a trial of several workers: a stopped trial's driver waits in the Train
            # run's `fit`, which only the end of its actor ends (its workers go with it).
            reuse_actors=workers is None,
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
        "gpu_memory": config.gpu_memory,
        WORKERS_PARAM: config.workers_per_trial,
        "code_version": _code_version(),
        "cluster_resources": json.dumps(ray.cluster_resources()),
        "ray_storage": redact_uri(config.path),
    }
    for key, value in params.items():
        client.log_param(run.info.run_id, key, str(value))
    client.log_dict(run.info.run_id, dataclasses.asdict(config.space), "search_space.json")
    return run.info.run_id
