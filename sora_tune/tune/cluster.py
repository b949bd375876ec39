"""What a search needs from a cluster whose trials run on other machines, checked before any
trial starts: storage every node reaches, a tracking store every node can write its adapters to,
and the model and data folders present on every node.

Two Ray nodes on one machine count as a cluster here too: what works for them only because
they share a disk would fail the day the second node is another machine.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..uris import local_store_path

# File systems that every machine of a cluster can mount.
NETWORK_FILESYSTEMS = {
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
TRACKING_FIX = (
    "use an MLflow server that serves artifacts (scripts/mlflow_server.sh start --host <address>, "
    "then --mlflow-uri http://<address>:5000), or a server whose artifact root every node "
    "reaches (mlflow server --artifacts-destination s3://bucket/path)"
)


def is_ray_client(address: str | None) -> bool:
    """Whether the search connects as a Ray Client: its Tuner then runs on the head node."""
    return bool(address) and address.startswith("ray://")


def check_client_storage(address: str | None, storage_path: str | None) -> None:
    """With `ray://`, Ray Tune runs the search's Tuner on the cluster's head node, which writes
    the experiment (and resumes it) there, while this machine writes the state `--resume` needs.
    Only a URI both reach names the same place.

    Raises:
        ValueError: a `ray://` address with a local (or no) storage path.
    """
    if not is_ray_client(address):
        return
    if storage_path is None or "://" not in storage_path or storage_path.startswith("file://"):
        raise ValueError(
            f"--address {address} runs the search's Tuner on the cluster's head node: give "
            "--storage-path as a URI that this machine and the head both reach (s3://bucket/path, "
            f"gs://bucket/path), not {storage_path or 'a local folder (the default)'}, which would "
            "name a folder on the head that this machine can neither check nor resume from"
        )


def check_tracking_for_cluster(
    mlflow_uri: str, *, nodes: int, address: str | None, artifact_location: str | None = None
) -> None:
    """Trials on other machines log their adapters where the tracking store puts artifacts: a
    local sqlite file or folder, or a server's local artifact folder, is not there.

    Args:
        mlflow_uri: The tracking URI.
        nodes: Alive Ray nodes.
        address: The `--address` given, if any (a cluster, whatever its size now).
        artifact_location: The experiment's artifact location, once it exists.

    Raises:
        ValueError: a cluster (more than one node, or an address) with a local store, or with an
            artifact location that is a local folder on no network file system.
    """
    if nodes <= 1 and not address:
        return
    where = f"{nodes} Ray nodes" if nodes > 1 else f"the Ray cluster at {address}"
    if local_store_path(mlflow_uri) is not None:
        raise ValueError(
            f"--mlflow-uri {mlflow_uri} is a store on this machine, but trials run on {where}: "
            f"a trial on another machine cannot write its adapter there; {TRACKING_FIX}"
        )
    folder = local_store_path(artifact_location) if artifact_location else None
    if folder is not None and not is_network_filesystem(str(folder)):
        raise ValueError(
            f"the MLflow server at {mlflow_uri} stores artifacts in {artifact_location}, a folder "
            f"of its own machine, but trials run on {where}; {TRACKING_FIX}"
        )


def check_storage(storage_path: str) -> None:
    """On a cluster with nodes on other machines, a local `storage_path` must be shared.

    Raises:
        ValueError: several machines, and a local path on no network file system.
    """
    import ray

    if "://" in storage_path:
        return
    addresses = {node["NodeManagerAddress"] for node in ray.nodes() if node.get("Alive")}
    if len(addresses) <= 1 or is_network_filesystem(storage_path):
        return
    raise ValueError(
        f"storage_path {storage_path} is a local folder, but the cluster spans {len(addresses)} "
        "machines: use shared storage (an NFS mount, s3://bucket/path or gs://bucket/path)"
    )


def check_paths_on_nodes(paths: dict[str, list[str]], timeout: float = 120.0) -> None:
    """Ask every alive node whether the given local paths exist there (a zero-CPU task pinned to
    each node), so that a model or data folder present only on the driver fails the search up
    front, not every trial on the other nodes.

    Args:
        paths: `{setting: [absolute paths]}`, e.g. `{"model": ["/models/minilm"]}`.
        timeout: Seconds to wait for the nodes' answers.

    Raises:
        ValueError: naming each setting, path and node that lacks it.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    wanted = sorted({path for values in paths.values() for path in values})
    if not wanted:
        return

    @ray.remote(num_cpus=0)
    def missing_here(candidates: list[str]) -> list[str]:
        return [path for path in candidates if not os.path.exists(path)]

    nodes = [node for node in ray.nodes() if node.get("Alive")]
    answers = ray.get(
        [
            missing_here.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            ).remote(wanted)
            for node in nodes
        ],
        timeout=timeout,
    )
    problems = [
        f"{setting} {path} is not on node {node['NodeID'][:8]} ({node['NodeManagerAddress']})"
        for node, missing in zip(nodes, answers, strict=True)
        for setting, values in paths.items()
        for path in values
        if path in missing
    ]
    if problems:
        raise ValueError(
            "every node runs trials, so every node needs the files they read: "
            + "; ".join(problems)
            + " (put them at the same path on every node, use shared storage, or give a Hugging "
            "Face Hub id as --model)"
        )


def is_network_filesystem(path: str) -> bool:
    """Whether `path` is on a file system other machines can mount (by /proc/mounts)."""
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return False
    path = os.path.realpath(path)
    best = max((m for m in mounts if path.startswith(m[1])), key=lambda m: len(m[1]), default=None)
    return best is not None and best[2] in NETWORK_FILESYSTEMS
