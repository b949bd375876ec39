#!/usr/bin/env bash
# A multi-node Ray cluster on one machine, on a loopback address (127.0.0.2), for trying
# sora-tune's cluster behaviour (trials spread over nodes, a node lost mid-trial) without a cloud
# account.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: scripts/cluster/local_cluster.sh start N [options]
       scripts/cluster/local_cluster.sh stop|status

Start a Ray head and N worker nodes on this machine, all on a loopback address, and print the
address to pass to `sora-tune search --address`. `stop` ends exactly the processes `start`
recorded (by session id, never by name); other Ray instances on the machine are left alone.

Loopback: the nodes use 127.0.0.2 by default, not 127.0.0.1, because Ray rewrites 127.0.0.1 and
localhost (in --node-ip-address, --address and ray.init) to the machine's network address; any
other 127.x.y.z address is kept. The nodes advertise it and the dashboard's and agents' HTTP
servers listen on it; Ray's own gRPC servers (GCS, raylets, dashboard agents) listen on every
interface whatever the node address (Ray has no setting for that), so Ray's token
authentication is on, with a token private to this cluster.

Two ways to run the nodes (--mode):
  ray-start   one `ray start --block` per node (head, then N workers joining it), each in its own
              session: separate raylets joined over TCP, as on a real cluster.
  in-process  one Python process that holds a ray.cluster_utils.Cluster with the head and N
              worker nodes (Ray's own multi-node test harness): the same raylets, GCS and
              scheduling, but the nodes are added and removed from Python, not by `ray start`.
  auto        (default) ray-start; if the workers do not join within the timeout, stop them and
              fall back to in-process, and say so.

Options:
  --cpus-per-node C   CPUs each worker offers (default 1)
  --head-cpus C       CPUs the head offers (default 0: trials run on the workers only)
  --port P            the head's GCS port (default 6380, not Ray's 6379, to keep off a default one)
  --ip ADDRESS        the nodes' loopback address (default 127.0.0.2, see above)
  --mode MODE         auto, ray-start or in-process (see above)
  --timeout S         seconds to wait for all nodes (default 90)
  -h, --help          this help

State (PIDs, logs, Ray's temp folder, the token) lives in $SORA_LOCAL_CLUSTER_DIR
(default /tmp/sora-local-cluster). Connect from a shell that has loaded the env file it writes
(the address and the token settings), e.g.

  scripts/cluster/local_cluster.sh start 2
  source /tmp/sora-local-cluster/env       # RAY_ADDRESS, RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH, ...
  sora-tune search --config search_spaces/quickstart.yaml --address "$RAY_ADDRESS" ...
  scripts/cluster/local_cluster.sh stop

Environment: PYTHON (default: python on PATH, with ray installed), RAY_CMD (default: ray).
EOF
}

die() {
    echo "local_cluster.sh: error: $*" >&2
    exit 2
}

state_dir=${SORA_LOCAL_CLUSTER_DIR:-/tmp/sora-local-cluster}
pids_file=$state_dir/pids        # one session id per line: every process we started leads one
address_file=$state_dir/address
env_file=$state_dir/env
log_dir=$state_dir/logs
python=${PYTHON:-python}
ray_cmd=${RAY_CMD:-ray}

command_name=${1:-}
case "$command_name" in
    start | stop | status) shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
esac

workers=
cpus_per_node=1
head_cpus=0
port=6380
ip=127.0.0.2
mode=auto
timeout=90
if [[ $command_name == start ]]; then
    [[ ${1:-} =~ ^[0-9]+$ ]] || die "start needs the number of worker nodes, e.g. start 2"
    workers=$1
    shift
fi
while (($#)); do
    case "$1" in
        --cpus-per-node) cpus_per_node=${2:?}; shift 2 ;;
        --head-cpus) head_cpus=${2:?}; shift 2 ;;
        --port) port=${2:?}; shift 2 ;;
        --ip) ip=${2:?}; shift 2 ;;
        --mode) mode=${2:?}; shift 2 ;;
        --timeout) timeout=${2:?}; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

alive_sessions() {
    # The recorded session ids that still have a process.
    [[ -f $pids_file ]] || return 0
    local sid
    while read -r sid; do
        [[ $sid =~ ^[0-9]+$ ]] || continue
        if pgrep -s "$sid" >/dev/null; then
            echo "$sid"
        fi
    done <"$pids_file"
}

session_pids() {
    # Every process of session $1 (Ray starts node processes, and raylets start workers, inside
    # the session of the `ray start` or Python process we launched).
    pgrep -s "$1" || true
}

stop_cluster() {
    local sid pid sessions
    sessions=$(alive_sessions)
    if [[ -z $sessions ]]; then
        echo "no local cluster running from $state_dir"
    else
        # Reverse order: workers first, the head last.
        for sid in $(tac <<<"$sessions"); do
            kill -TERM "$sid" 2>/dev/null || true   # `ray start --block` / the Python holder
        done
        for _ in $(seq 60); do
            [[ -z $(alive_sessions) ]] && break
            sleep 0.25
        done
        for sid in $(alive_sessions); do
            for pid in $(session_pids "$sid"); do
                kill -KILL "$pid" 2>/dev/null || true
            done
        done
        sleep 0.5
        [[ -z $(alive_sessions) ]] || die "processes of sessions $(alive_sessions | xargs) survived"
        echo "stopped the local cluster (sessions $(xargs <<<"$sessions"))"
    fi
    # A stale ray_current_cluster would make a later ray.init() try to join this dead cluster.
    rm -f "$pids_file" "$address_file" "$env_file" "$state_dir/tmp/ray/ray_current_cluster"
}

case "$command_name" in
    stop) stop_cluster; exit 0 ;;
    status)
        sessions=$(alive_sessions)
        if [[ -z $sessions ]]; then
            echo "no local cluster running from $state_dir"
            exit 1
        fi
        echo "local cluster at $(cat "$address_file" 2>/dev/null || echo '?'), sessions: $(xargs <<<"$sessions")"
        exit 0
        ;;
esac

# start
[[ $mode =~ ^(auto|ray-start|in-process)$ ]] || die "--mode must be auto, ray-start or in-process"
[[ -z $(alive_sessions) ]] || die "a local cluster is already running from $state_dir; stop it first"
"$python" -c 'import ray' 2>/dev/null || die "$python cannot import ray: activate the environment or set PYTHON"
mkdir -p "$state_dir/tmp/ray" "$log_dir"   # Ray fails on ray_current_cluster without tmp/ray
chmod 700 "$state_dir"
rm -f "$pids_file" "$address_file" "$state_dir/tmp/ray/ray_current_cluster"
if [[ ! -s $state_dir/auth_token ]]; then
    (umask 077 && "$python" -c 'import secrets; print(secrets.token_hex(32))' >"$state_dir/auth_token")
fi

# Whatever goes wrong before the cluster is up (an error, Ctrl-C, a timeout's SIGTERM), stop
# what was started.
start_complete=false
cleanup_unless_started() {
    if [[ $start_complete != true ]]; then
        stop_cluster >/dev/null 2>&1 || true
    fi
}
trap cleanup_unless_started EXIT
trap 'exit 130' INT TERM

export RAY_TMPDIR=$state_dir/tmp
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$state_dir/auth_token
export RAY_USAGE_STATS_ENABLED=0
unset RAY_ADDRESS RAY_AUTH_TOKEN

[[ $ip =~ ^127\.[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "--ip must be a loopback address (127.x.y.z)"
[[ $ip != 127.0.0.1 ]] || die "--ip 127.0.0.1 is rewritten by Ray to this machine's network address; use 127.0.0.2"
address=$ip:$port

wait_for_nodes() {
    # Connects as a driver and waits until $1 nodes are alive; prints where each node is.
    timeout $((timeout + 30)) "$python" - "$address" "$1" "$timeout" <<'PY'
import sys, time
import ray

address, expected, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
ray.init(address=address, logging_level="ERROR", log_to_driver=False)
deadline = time.time() + timeout
alive = []
while time.time() < deadline:
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) >= expected:
        break
    time.sleep(1)
for node in alive:
    print(f"  node {node['NodeID'][:12]} at {node['NodeManagerAddress']}, "
          f"CPU {node['Resources'].get('CPU', 0):g}")
sys.exit(0 if len(alive) >= expected else 1)
PY
}

wait_for_log() {
    # Until file $1 has the line $2, while process $3 lives, for at most $timeout seconds.
    local _
    for _ in $(seq $((timeout * 4))); do
        grep -q "$2" "$1" 2>/dev/null && return 0
        kill -0 "$3" 2>/dev/null || return 1
        sleep 0.25
    done
    return 1
}

free_port() {
    "$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start_with_ray_start() {
    # Each node is its own session (setsid), so that stop can end it and everything it started.
    local i
    setsid "$ray_cmd" start --head --block \
        --node-ip-address="$ip" --port="$port" --num-cpus="$head_cpus" \
        --include-dashboard=false --dashboard-agent-listen-port="$(free_port)" \
        --temp-dir="$RAY_TMPDIR/ray" \
        --disable-usage-stats >"$log_dir/head.log" 2>&1 </dev/null &
    local head=$!
    echo "$head" >>"$pids_file"
    # Wait for the head's GCS port (or for the head to give up).
    "$python" -c '
import os, socket, sys, time
host, port = sys.argv[1].split(":")
head, deadline = int(sys.argv[2]), time.time() + float(sys.argv[3])
while time.time() < deadline:
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
        sys.exit(0)
    except OSError:
        try:
            os.kill(head, 0)
        except OSError:
            sys.exit("the head exited")
        time.sleep(0.5)
sys.exit("no head within the timeout")' "$address" "$head" "$timeout" || {
        tail -5 "$log_dir/head.log" >&2
        return 1
    }
    # One worker at a time: workers of one machine that start together race for the same log
    # files and ports, and one of them never registers.
    for i in $(seq "$workers"); do
        setsid "$ray_cmd" start --block --address="$address" \
            --node-ip-address="$ip" --num-cpus="$cpus_per_node" \
            --dashboard-agent-listen-port="$(free_port)" \
            --disable-usage-stats >"$log_dir/worker-$i.log" 2>&1 </dev/null &
        local worker=$!
        echo "$worker" >>"$pids_file"
        wait_for_log "$log_dir/worker-$i.log" "Ray runtime started" "$worker" || {
            tail -5 "$log_dir/worker-$i.log" >&2
            return 1
        }
    done
    wait_for_nodes $((workers + 1))
}

start_in_process() {
    setsid "$python" - "$workers" "$cpus_per_node" "$head_cpus" "$ip" "$port" "$address_file.tmp" \
        >"$log_dir/in-process.log" 2>&1 </dev/null <<'PY' &
# One process holding a ray.cluster_utils.Cluster: a head and N workers on a loopback address.
# It lives until SIGTERM, then shuts every node down.
import signal, sys
from pathlib import Path
from ray.cluster_utils import Cluster

workers, cpus, head_cpus, ip, port, address_file = sys.argv[1:7]
loopback = {"node_ip_address": ip}
cluster = Cluster(
    initialize_head=True,
    head_node_args={"num_cpus": float(head_cpus), "gcs_server_port": int(port),
                    "include_dashboard": False,
                    **loopback},
)
for _ in range(int(workers)):
    cluster.add_node(num_cpus=float(cpus), **loopback)
cluster.wait_for_nodes()
Path(address_file).write_text(cluster.address + "\n")
print(f"cluster up at {cluster.address}", flush=True)

def stop(*_):
    cluster.shutdown()
    sys.exit(0)

signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
while True:
    signal.pause()
PY
    echo $! >>"$pids_file"
    for _ in $(seq $((timeout * 2))); do
        [[ -s $address_file.tmp ]] && break
        kill -0 "$(head -1 "$pids_file")" 2>/dev/null || { tail -20 "$log_dir/in-process.log" >&2; return 1; }
        sleep 0.5
    done
    [[ -s $address_file.tmp ]] || return 1
    address=$(<"$address_file.tmp")
    rm -f "$address_file.tmp"
    wait_for_nodes $((workers + 1))
}

started=
if [[ $mode != in-process ]]; then
    echo "starting a head and $workers worker(s) with ray start on $address ..."
    if start_with_ray_start; then
        started=ray-start
    else
        echo "the nodes did not all join within ${timeout} s (logs: $log_dir)" >&2
        stop_cluster >/dev/null
        mkdir -p "$state_dir/tmp/ray" "$log_dir"
        [[ $mode == auto ]] || die "ray start failed; try --mode in-process"
    fi
fi
if [[ -z $started ]]; then
    echo "starting a head and $workers worker(s) in one process (ray.cluster_utils.Cluster) ..."
    start_in_process || { stop_cluster >/dev/null; die "the in-process cluster did not start (log: $log_dir/in-process.log)"; }
    started=in-process
fi

start_complete=true
echo "$address" >"$address_file"
cat >"$env_file" <<EOF
# source this file to use the local cluster ($started mode)
export RAY_ADDRESS=$address
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$state_dir/auth_token
export RAY_USAGE_STATS_ENABLED=0
EOF
echo "local cluster up ($started mode): $((workers + 1)) nodes at $address"
echo "use it:   source $env_file && sora-tune search ... --address $address"
echo "stop it:  $0 stop"
