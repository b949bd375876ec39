"""Trials of several workers: one trial as a Ray Train run inside the search.

With `workers_per_trial` N > 1, every Tune trial is a driver: it starts a Ray Train V2
`TorchTrainer` of N workers (DDP-style data parallelism on nccl between whole GPUs, on gloo on
the CPU or on GPU shares) and waits for it. The workers run the trial's one training loop
(`train.train_trial` through `trial.train_and_report`), each on its share of every batch; rank 0
records the trial's MLflow run and reports each evaluation with its checkpoint through
`ray.train.report`, which `TuneReportCallback` forwards to Tune's schedulers and searcher.

Resources, as Ray's guide to Train inside Tune has them: the workers hold the CPUs and GPUs
(`cpus_per_trial` and `gpus_per_trial` each), the Tune trial only drives them and holds a
token amount of memory (Tune refuses a trial of no resources at all, and a CPU share would keep
N whole-CPU workers off an N-CPU machine). The workers' request (`ScalingConfig`'s
`resources_per_worker`) is built inside the trial from its own settings, so with
`gpus_per_trial: auto` each trial's workers ask for the share one worker's estimate needs
(`tune.resources`), and each worker is capped at it on a GPU. Tune cannot see the workers'
needs, so the search runs at most as many trials at once as the cluster holds worker groups of
its largest trial (`trials_at_once`).

Checkpoints live with the Train run (`<search folder>/workers/trial_<id>`), not with Tune: a
restarted Tune trial (a retry, a resumed search) starts a Train run of the same name, which
resumes from that run's last checkpoint, as Ray's guide prescribes. A worker that dies fails the
Train run and with it the Tune trial, which Tune retries (`max_failures`) from that checkpoint;
Train's own retries are off, so that a trial is not retried `max_failures` squared times.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import TrialConfig, check_batch_size

if TYPE_CHECKING:
    from .config import SearchConfig
    from .resources import GpuRequest
    from .space import SearchSpace

# What a Tune trial that drives a Ray Train run holds: a token of memory (bytes), so that it is
# scheduled anywhere and takes nothing the workers need.
DRIVER_RESOURCES = {"memory": 2**20}
# Tune's grace for the actor of a stopped trial before it kills it (its variable, and ours: a
# stopped trial's workers hold their resources until then).
FORCE_CLEANUP_ENV = "TUNE_FORCE_TRIAL_CLEANUP_S"
STOPPED_TRIAL_SECONDS = 10


def check_worker_batch_sizes(space: SearchSpace, workers: int) -> None:
    """Refuse a space whose trials' batches do not split across `workers`: every `batch_size`
    it takes is a multiple of `workers`, and a searched one is a choice (an `int` range would
    take the sizes between).

    Raises:
        ValueError: naming the batch size and the workers.
    """
    if workers == 1:
        return
    spec = space.distributions.get("batch_size")
    if spec is not None and spec["type"] != "choice":
        raise ValueError(
            f"batch_size is searched as {spec['type']}, which takes sizes that do not split "
            f"across workers_per_trial {workers}: search it as a choice of multiples of {workers}"
        )
    for batch_size in space.values("batch_size"):
        check_batch_size(batch_size, workers)


def check_stops_free_workers(timeout_s: float = 60) -> None:
    """Refuse to stop trials of several workers early where their workers would never be freed.

    A trial that a scheduler stops is a Tune actor waiting in its Train run; Tune ends the actor,
    the run's controller goes with it, and Ray Train's `PlacementGroupCleaner`, an actor on the
    head node, frees the workers' reservation once Ray's state API says the controller is gone.
    That API is served by the dashboard, which needs `ray[default]` and a Ray started with it
    (`ray.init(include_dashboard=False)` has none). Where the cleaner cannot ask, the reservation
    stays and every later trial waits for resources that never come (seen here with a Ray
    started without its dashboard). So a task on the head node asks the state API as the cleaner
    does (no address: `RAY_ADDRESS`, else the one Ray running on that machine) about its own
    node. This sees the moment the search starts only: by Ray's code, a second Ray started later
    on the head's machine makes the cleaner's lookup fail ("multiple active Ray instances") and
    its reservation stay, unless `RAY_ADDRESS` names the cluster there.

    Raises:
        ValueError: the state API does not answer for this cluster, naming why.
    """
    import ray
    from ray._common.constants import HEAD_NODE_RESOURCE_NAME  # where the cleaner runs

    ask = ray.remote(num_cpus=0, resources={HEAD_NODE_RESOURCE_NAME: 0.001})(_state_api_error)
    reason = ray.get(ask.remote(), timeout=timeout_s)
    if reason is not None:
        raise ValueError(
            "early stopping (asha, early_stop pareto) of trials of several workers needs Ray's "
            f"state API to free a stopped trial's workers, and {reason}; or give "
            "workers_per_trial 1 or no early stopping"
        )


def _state_api_error() -> str | None:
    """Why the state API, asked from this Ray worker as Ray Train's cleaner asks it, does not
    answer for this worker's node; `None` when it does."""
    import ray
    from ray._private.utils import get_dashboard_dependency_error  # what ray.init checks
    from ray.util.state import get_node

    missing = get_dashboard_dependency_error()
    if missing is not None:
        return f"this Ray has no dashboard ({missing}): pip install 'ray[default]'"
    try:
        node = get_node(ray.get_runtime_context().get_node_id(), timeout=10)
    except Exception as err:  # each way of failing (unserved, several Rays) is a reason
        first_line = str(err).splitlines()[0] if str(err) else ""
        return (
            f"it does not answer on this cluster ({type(err).__name__}: {first_line}): start "
            "Ray with its dashboard (the default of ray.init and ray start)"
        )
    return None if node is not None else "the state API reached is another Ray's: set RAY_ADDRESS"


@dataclass(frozen=True)
class WorkerGroup:
    """The workers of every trial of a search.

    Attributes:
        size: Workers per trial (> 1).
        cpus: CPUs of each worker (`cpus_per_trial`).
        gpus: How each worker's GPU share is found (`gpus_per_trial`, a share or `auto`, for
            each worker); `None`: no GPUs.
        most_gpus: The largest GPU share of a worker of the search's trials (0: none).
        storage_path: Where the trials' Ray Train runs keep their checkpoints.
    """

    size: int
    cpus: float
    gpus: GpuRequest | None
    most_gpus: float
    storage_path: str

    @classmethod
    def of(cls, config: SearchConfig, gpus: GpuRequest | None) -> WorkerGroup | None:
        """The worker group of a search's trials, given GPUs as `gpus` says (`search.gpu_request`);
        `None` when a trial is one process."""
        from .resources import largest_trial_gpus  # not at the top: tune.config imports this

        if config.workers_per_trial == 1:
            return None
        return cls(
            size=config.workers_per_trial,
            cpus=config.cpus_per_trial,
            gpus=gpus,
            most_gpus=largest_trial_gpus(config.space, gpus) if gpus is not None else 0.0,
            storage_path=f"{config.path}/workers",
        )

    def worker_gpus(self, config: TrialConfig) -> float:
        """The GPU share of each worker of the trial of `config`."""
        from .resources import trial_gpus

        return trial_gpus(config, self.gpus) if self.gpus is not None else 0.0

    def trials_at_once(self, cluster: dict[str, float], max_concurrent: int | None) -> int:
        """At most `max_concurrent` trials (`None`: no limit), and no more than the `cluster`'s
        resources (`ray.cluster_resources()`) hold whole worker groups of: a Train run starts
        only when all its workers can, and Tune does not count them (Ray's advice:
        `max_concurrent_trials` from the limiting resource). Groups are counted at the largest
        trial's shares (`most_gpus`), so that any trials that run at once fit together and none
        waits for its workers.

        Raises:
            ValueError: the cluster cannot hold the workers of a single trial.
        """
        needs = {"CPU": self.size * self.cpus, "GPU": self.size * self.most_gpus}
        fits = min(
            int(cluster.get(name, 0.0) / need + 1e-9) for name, need in needs.items() if need > 0
        )
        if fits < 1:
            has = ", ".join(f"{cluster.get(name, 0.0):g} {name}" for name in needs)
            raise ValueError(
                f"a trial of workers_per_trial {self.size} needs {needs['CPU']:g} CPU and "
                f"{needs['GPU']:g} GPU (cpus_per_trial and gpus_per_trial are per worker); the "
                f"Ray cluster has {has}: give fewer workers or less to each"
            )
        return min(fits, max_concurrent) if max_concurrent else fits


def run_workers(
    config: TrialConfig,
    group: WorkerGroup,
    trial_id: str,
    run_id: str,
    tracking_uri: str,
    *,
    data=None,
    sources=None,
) -> None:
    """Run the trial `trial_id` as a Ray Train run of `group.size` workers and wait for it,
    from inside its Tune trial; rank 0 records it in the MLflow run `run_id`.

    Raises:
        ray.train.TrainingFailedError: a worker failed (Tune retries the trial).
    """
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    gpus = group.worker_gpus(config)
    resources = {"CPU": group.cpus} | ({"GPU": gpus} if gpus else {})
    trainer = TorchTrainer(
        _worker,
        train_loop_config={
            "trial": dataclasses.asdict(config),
            "run_id": run_id,
            "tracking_uri": tracking_uri,
            # Through the object store once, not pickled into every worker's arguments.
            "data": ray.put(data) if data is not None else None,
            "sources": sources,
            "gpus": group.gpus if gpus else None,
        },
        torch_config=TorchConfig(backend=worker_backend(gpus)),
        scaling_config=ray.train.ScalingConfig(
            num_workers=group.size, use_gpu=gpus > 0, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            # The trial's id, nothing random: a restarted trial finds its run's checkpoints.
            name=f"trial_{trial_id}",
            storage_path=group.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=0),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()


def worker_backend(gpus: float) -> str:
    """torch.distributed's backend for workers of `gpus` GPUs each: nccl between whole GPUs;
    gloo on the CPU, and on GPU shares, where two workers may get the same GPU, which nccl
    refuses."""
    return "nccl" if gpus >= 1 else "gloo"


def _worker(loop: dict[str, Any]) -> None:
    """One worker of a trial's Ray Train run: the trial's training on its share, reported with
    `ray.train.report` by every worker alike; rank 0 records and checkpoints it."""
    import ray
    import ray.train
    import torch
    from mlflow import MlflowClient

    from ..distributed import Workers
    from ..tracking import TrialRecord
    from ..train import trial_dtypes
    from .resources import gpu_memory_plan
    from .trial import record_placement, train_and_report

    workers = Workers.current()
    config = TrialConfig.from_dict(loop["trial"])
    # Ray no longer hides a node's GPUs from workers that asked for none: the CPU unless asked,
    # and on GPUs Ray lists where torch has no CUDA (logical GPUs, as `trial.trial_device`).
    gpus = loop["gpus"]
    cuda = gpus is not None and torch.cuda.is_available()
    device = ray.train.torch.get_device() if cuda else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # where nccl's collectives of Python objects run
    # Every worker capped at its share; rank 0 logs the plan and its peak.
    memory = gpu_memory_plan(config, gpus, str(device)) if gpus is not None else None

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    record = None
    checkpoint = ray.train.get_checkpoint()
    with (
        tempfile.TemporaryDirectory(prefix="sora-trial-") as output_dir,
        checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as resume_from,
    ):
        if workers.main:
            client = MlflowClient(loop["tracking_uri"])
            record_placement(client, loop["run_id"], str(device))
            if memory is not None:
                memory.log(client, loop["run_id"])
            record = TrialRecord(client, loop["run_id"], config, Path(output_dir))
        train_and_report(
            config,
            report,
            record=record,
            dtypes=trial_dtypes(config, device),
            memory=memory,
            data=ray.get(loop["data"]) if loop["data"] is not None else None,
            sources=loop["sources"],
            output_dir=output_dir,
            resume_from=resume_from,
            device=device,
            workers=workers,
        )
