"""How to search (`SearchConfig`): the settings of a search besides its space. No Ray, MLflow or
torch here, so the CLI can build its flags from these fields and check them up front."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Literal

from ..config import check_shard_base, literal_choices
from ..data.tasks import data_name
from ..front import OBJECTIVES
from ..memory import memory_size
from ..uris import default_tracking_uri, local_store_path, resolve_tracking_uri
from .cluster import check_client_storage, check_tracking_for_cluster
from .space import SearchSpace
from .workers import check_worker_batch_sizes

AUTO = "auto"

Sampler = Literal["tpe", "nsga2", "gp", "random"]
Baseline = Literal["none", "lora-ladder"]


@dataclass
class SearchConfig:
    """How to search.

    Args:
        space: The validated search space (`load_search_space`), CLI overrides already fixed.
        num_samples: Number of trials.
        sampler: Optuna sampler: `tpe`, `nsga2`, `gp` or `random`. NSGA-II's population is a
            quarter of `num_samples`, 4 to 50 (Optuna's default 50 would leave an 8-32 trial
            search in its random first generation).
        objective: `multi` (`OBJECTIVES`: maximise val_score, minimise retained_params) or
            `val_score` alone.
        asha: Stop poor trials early with ASHA (single objective only).
        early_stop: `pareto`: multi-objective asynchronous successive halving (MO-ASHA) on the
            objectives; `none`: every trial runs to the end.
        grace_period: Epochs before the first rung of `asha` or `early_stop`.
        reduction_factor: Rungs at `grace_period · reduction_factor^k` epochs; at each, a trial
            goes on when its rank among those there, over their number, is ≤ 1/reduction_factor.
            `None`: 4 for ASHA (Ray's default), 3 for `pareto` (syne-tune's).
        sampler_seed: Seeds the sampler.
        tpe_startup_trials: TPE's random trials before it models; `None`: a fifth of
            `num_samples`, 4 to 10 (`tpe_startup_trials`).
        max_failures: Retries of a trial that crashed (a node lost, an exception).
        baseline: `lora-ladder`: before the search's trials, LoRA trials of rank 1, 2, 4, … up to
            the space's largest r_max at the settings of its first point (`tune.baselines`),
            recorded as baselines; `pareto` and the search's end compare SoRA's front with them.
        baseline_seeds: Seeds of each ladder rank.
        name: The Ray experiment name (a folder under `storage_path`) and the Optuna study's; a
            new search refuses the name of an earlier one (`--resume` finishes that).
        cpus_per_trial, gpus_per_trial: Resources of one trial. A trial is one process on one
            device: at most 1 GPU, and fractions let several small trials share one. `auto`:
            each trial's share from its own memory estimate, in eighths of `gpu_memory`
            (`tune.resources`); a trial that fits no GPU is refused before the search starts.
            On a GPU, a trial with a share is capped at it
            (`torch.cuda.set_per_process_memory_fraction`). With `workers_per_trial` > 1, the
            resources of each of the trial's workers; `auto` then sizes each worker from the
            estimate of one worker, and caps each.
        gpu_memory: The memory of the cluster's smallest GPU (`24GiB`, `80GB`), which `auto`
            shares are eighths of; `None`: asked of the cluster's GPUs when the search starts.
        workers_per_trial: Processes of one trial (`tune.workers`): 1 trains in the Tune trial
            itself; N > 1 makes each trial a Ray Train run of N data-parallel workers, each on
            `1/N` of every batch (`batch_size` must be a multiple of N), with the results of
            one process.
        max_concurrent: At most this many trials at once; `None`: `default_max_concurrent`, a
            quarter of `num_samples` (at least 2) for the model-based samplers, so that they see
            finished trials before they suggest most of theirs; as many as resources allow for
            `random`.
        address: `None` starts a local Ray; `auto` or `ray://host:port` joins a cluster.
        storage_path: Where Ray keeps the experiment state; shared storage (NFS, s3://, gs://)
            for several nodes, a URI with `ray://`.
        mlflow_uri: MLflow tracking URI; by default `MLFLOW_TRACKING_URI`, else `./mlflow.db`.
            A relative local store is taken from the current folder. A cluster needs a server
            that serves artifacts.
        experiment_name: MLflow experiment; `None`: `sora-<task, file stem or dataset id>`.
        optuna_storage: Where Optuna keeps the study, so `optuna-dashboard` and
            `optuna.load_study` read it: an RDB URL. `None`: `optuna.db` beside a local MLflow
            store, else in memory (Ray still saves the sampler's state for `--resume`).
    """

    space: SearchSpace
    # search
    num_samples: int = 8  # trials
    sampler: Sampler = "tpe"  # Optuna sampler; nsga2 population: num_samples/4, 4-50
    objective: Literal["multi", "val_score"] = "multi"  # multi: max val_score, min retained_params
    asha: bool = False  # ASHA early stopping (single objective only)
    early_stop: Literal["none", "pareto"] = "none"  # pareto: multi-objective successive halving
    grace_period: int = 1  # epochs before the first rung of --asha or --early-stop
    reduction_factor: float | None = None  # rung spacing; best 1/rf go on; none: 4 asha, 3 pareto
    sampler_seed: int = 0  # seeds the sampler
    tpe_startup_trials: int | None = None  # TPE's random first trials; none: num_samples/5, 4-10
    max_failures: int = 1  # retries of a trial that crashed (a lost node, an exception)
    baseline: Baseline = "none"  # lora-ladder: LoRA at ranks 1, 2, 4, … r_max beside SoRA
    baseline_seeds: int = 1  # seeds of every rank of the LoRA ladder
    name: str | None = None  # a new Ray experiment and Optuna study; none: <experiment-name>-<time>
    # resources
    cpus_per_trial: float = 1.0  # CPUs of one trial
    gpus_per_trial: float | Literal["auto"] = 0.0  # ≤ 1; 0.5: two share a GPU; auto: estimated
    gpu_memory: str | None = None  # the smallest GPU's memory, e.g. 24GiB; none: asked of the GPUs
    workers_per_trial: int = 1  # data-parallel processes of a trial (a Ray Train run when > 1)
    max_concurrent: int | None = None  # trials at once; none: num_samples/4, >= 2 (random: all)
    address: str | None = None  # Ray cluster: auto or ray://host:port; none: a local Ray
    storage_path: str | None = None  # Ray experiment storage; shared (NFS, s3://) on a cluster
    # tracking
    mlflow_uri: str | None = None  # none: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment_name: str | None = None  # MLflow experiment; none: sora-<task, file stem or dataset>
    optuna_storage: str | None = None  # Optuna RDB URL; none: optuna.db beside a local store

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        for name in ("sampler", "objective", "early_stop", "baseline"):
            choices = literal_choices(SearchConfig, name)
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}"
                )
        if self.asha and self.objective == "multi":
            raise ValueError(
                "asha early stopping needs a single objective: use objective val_score "
                "(or early_stop pareto, which takes both)"
            )
        if self.asha and self.early_stop != "none":
            raise ValueError("choose one of asha and early_stop")
        if self.baseline != "none" and self.objective != "multi":
            raise ValueError(
                f"baseline {self.baseline} is compared on the front of both objectives: use "
                "objective multi"
            )
        if self.baseline_seeds < 1:
            raise ValueError(f"baseline_seeds must be >= 1, got {self.baseline_seeds}")
        if self.grace_period < 1:
            raise ValueError(f"grace_period must be >= 1 epoch, got {self.grace_period}")
        if self.reduction_factor is not None and not self.reduction_factor > 1:
            raise ValueError(f"reduction_factor must be > 1, got {self.reduction_factor}")
        if self.cpus_per_trial <= 0:
            raise ValueError(f"cpus_per_trial must be > 0, got {self.cpus_per_trial:g}")
        if isinstance(self.gpus_per_trial, str) and self.gpus_per_trial != AUTO:
            raise ValueError(
                f"gpus_per_trial must be a number or auto, got {self.gpus_per_trial!r}"
            )
        if self.gpus_per_trial != AUTO and self.gpus_per_trial < 0:
            raise ValueError(f"gpus_per_trial must be >= 0, got {self.gpus_per_trial:g}")
        if self.gpus_per_trial != AUTO and self.gpus_per_trial > 1:
            raise ValueError(
                f"gpus_per_trial must be at most 1, got {self.gpus_per_trial:g}: a trial is one "
                "process on one device (fractions such as 0.5 let trials share a GPU); run more "
                "trials at once instead"
            )
        if self.gpu_memory is not None:
            memory_size(self.gpu_memory)  # refused here if not a size
        if self.workers_per_trial < 1:
            raise ValueError(f"workers_per_trial must be >= 1, got {self.workers_per_trial}")
        check_worker_batch_sizes(self.space, self.workers_per_trial)
        for shard_base in self.space.values("shard_base"):
            check_shard_base(shard_base, self.workers_per_trial)
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {self.max_concurrent}")
        if self.max_concurrent is None:
            self.max_concurrent = default_max_concurrent(self.sampler, self.num_samples)
        check_client_storage(self.address, self.storage_path)
        # Paths are taken from the user's folder here, on the driver: Ray starts every trial in
        # a folder of its own.
        if self.storage_path is None or "://" not in self.storage_path:
            self.storage_path = os.path.abspath(self.storage_path or "ray_results")
        self.mlflow_uri = resolve_tracking_uri(self.mlflow_uri or default_tracking_uri())
        check_tracking_for_cluster(self.mlflow_uri, nodes=1, address=self.address)
        store = local_store_path(self.mlflow_uri)
        if self.optuna_storage is None and store is not None:
            self.optuna_storage = f"sqlite:///{store.parent / 'optuna.db'}"
        elif self.optuna_storage is not None:
            self.optuna_storage = resolve_tracking_uri(self.optuna_storage)
        self.space = self.space.with_resolved_paths()
        self.experiment_name = self.experiment_name or default_experiment(self.space)
        self.name = self.name or f"{self.experiment_name}-{time.strftime('%Y%m%d-%H%M%S')}"

    @property
    def path(self) -> str:
        """The search's Ray folder: what `--resume` takes."""
        return f"{self.storage_path}/{self.name}"

    @property
    def gpu_bytes(self) -> int | None:
        """`gpu_memory` in bytes, if given."""
        return None if self.gpu_memory is None else memory_size(self.gpu_memory)

    @property
    def directions(self) -> dict[str, str]:
        """The objectives Optuna and the scheduler are given, with their directions
        (`"maximize"`, `"minimize"`)."""
        if self.objective == "multi":
            return dict(OBJECTIVES)
        return {"val_score": OBJECTIVES["val_score"]}


def default_max_concurrent(sampler: Sampler, num_samples: int) -> int | None:
    """Trials at once when `max_concurrent` is not given: `None` (as many as resources allow) for
    random search, else a quarter of `num_samples`, at least 2. Measured with
    `scripts/bench_concurrency.py` (docs/benchmarks.md): with every trial started at once TPE is
    random search, and at a quarter it keeps nearly all it gains when trials run one by one, in a
    quarter of their wall time. NSGA-II's population is the same quarter (`nsga2_population`), so
    a generation runs side by side."""
    return None if sampler == "random" else max(2, num_samples // 4)


def default_experiment(space: SearchSpace) -> str:
    """One MLflow experiment per data: `sora-<task>`, `sora-<training file stem>` or
    `sora-<dataset id>` (joined with `-` when the data are searched), so that selecting from an
    experiment never mixes tasks."""
    own = [("train_file", v) for v in space.values("train_file") if v is not None]
    own += [("dataset", v) for v in space.values("dataset") if v is not None]
    if own:
        return "sora-" + "-".join(data_name(**{name: value}) for name, value in own)
    return "sora-" + "-".join(data_name(task=task) for task in space.values("task"))


# The command line's groups of SearchConfig's fields (`space` comes from --config).
SEARCH_GROUPS = {
    "search": (
        "num_samples",
        "sampler",
        "objective",
        "asha",
        "early_stop",
        "grace_period",
        "reduction_factor",
        "sampler_seed",
        "tpe_startup_trials",
        "max_failures",
        "baseline",
        "baseline_seeds",
        "name",
    ),
    "resources": (
        "cpus_per_trial",
        "gpus_per_trial",
        "gpu_memory",
        "workers_per_trial",
        "max_concurrent",
        "address",
        "storage_path",
    ),
    "tracking": ("mlflow_uri", "experiment_name", "optuna_storage"),
}
