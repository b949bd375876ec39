#!/usr/bin/env bash
# An MLflow tracking server for sora-tune searches: sqlite or PostgreSQL, an artifact root served
# through the server (trials upload over HTTP, so workers need no shared disk and no bucket
# credentials), 127.0.0.1 unless --host says otherwise, optional basic auth.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: scripts/mlflow_server.sh start [options]
       scripts/mlflow_server.sh stop|status [--state-dir DIR]

Start or stop an MLflow tracking server in the background (PID file, log file and, for sqlite,
the database under the state folder). `start` returns once /health answers.

Options:
  --backend sqlite|postgresql  sqlite (default): <state>/mlflow.db. postgresql: the SQLAlchemy
                               URI in the environment variable MLFLOW_BACKEND_URI, e.g.
                               postgresql://mlflow@db.internal:5432/mlflow, with the password in
                               PGPASSWORD (never on the command line, where ps and logs show it);
                               needs a driver next to mlflow: pip install 'psycopg[binary]'
  --host ADDRESS               interface to bind (default 127.0.0.1: this machine only; use the
                               node's private address or 0.0.0.0 for a cluster, with --basic-auth)
  --port PORT                  default 5000
  --artifacts DIR|URI          artifact root the server stores uploads in (default
                               <state>/artifacts; s3://bucket/prefix takes AWS_* from the env)
  --state-dir DIR              default ${XDG_STATE_HOME:-~/.local/state}/sora-tune/mlflow
  --workers N                  server worker processes (default 1: ~0.5 GB instead of ~2.5 GB)
  --basic-auth                 MLflow's basic-auth app; the admin is MLFLOW_TRACKING_USERNAME
                               with password MLFLOW_TRACKING_PASSWORD (12+ characters) from the
                               environment, created the first time. Needs Flask-WTF
                               (pip install 'mlflow[auth]'). Clients use the same two variables.
  -h, --help                   this help

Environment: MLFLOW_CMD (default: mlflow on PATH).

Examples:
  scripts/mlflow_server.sh start
  export MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD='a long secret'
  scripts/mlflow_server.sh start --basic-auth --host 10.0.0.5 --port 5000
  MLFLOW_BACKEND_URI=postgresql://mlflow@db:5432/mlflow PGPASSWORD=... \
      scripts/mlflow_server.sh start --backend postgresql --artifacts s3://bucket/mlflow
  scripts/mlflow_server.sh stop
EOF
}

die() {
    echo "mlflow_server.sh: error: $*" >&2
    exit 2
}

command_name=${1:-}
case "$command_name" in
    start | stop | status) shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
esac

backend=sqlite
host=127.0.0.1
port=5000
workers=1
artifacts=
basic_auth=false
state_dir=${XDG_STATE_HOME:-$HOME/.local/state}/sora-tune/mlflow
while (($#)); do
    case "$1" in
        --backend) backend=${2:?--backend needs a value}; shift 2 ;;
        --host) host=${2:?--host needs a value}; shift 2 ;;
        --port) port=${2:?--port needs a value}; shift 2 ;;
        --artifacts) artifacts=${2:?--artifacts needs a value}; shift 2 ;;
        --state-dir) state_dir=${2:?--state-dir needs a value}; shift 2 ;;
        --workers) workers=${2:?--workers needs a value}; shift 2 ;;
        --basic-auth) basic_auth=true; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

pid_file=$state_dir/server.pid
log_file=$state_dir/server.log

running_pid() {
    # The recorded PID, if that process is still alive.
    [[ -f $pid_file ]] || return 1
    local pid
    pid=$(<"$pid_file")
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

stop_server() {
    local pid
    if ! pid=$(running_pid); then
        echo "no MLflow server running from $state_dir"
        rm -f "$pid_file"
        return 0
    fi
    # The server was started in its own session: its PID is its process group, which holds the
    # uvicorn workers too. Stop the group by that id, never by process name.
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 50); do
        kill -0 -- "-$pid" 2>/dev/null || break
        sleep 0.2
    done
    if kill -0 -- "-$pid" 2>/dev/null; then
        kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    rm -f "$pid_file"
    echo "stopped MLflow server (process group $pid)"
}

case "$command_name" in
    stop) stop_server; exit 0 ;;
    status)
        if pid=$(running_pid); then
            echo "MLflow server running: PID $pid, state $state_dir"
        else
            echo "no MLflow server running from $state_dir"
            exit 1
        fi
        exit 0
        ;;
esac

# start
mlflow_cmd=${MLFLOW_CMD:-mlflow}
command -v "$mlflow_cmd" >/dev/null || die "$mlflow_cmd not found: install mlflow or set MLFLOW_CMD"
[[ $port =~ ^[0-9]+$ ]] || die "--port must be a number, got $port"
[[ $workers =~ ^[1-9][0-9]*$ ]] || die "--workers must be a positive number, got $workers"
if pid=$(running_pid); then
    die "an MLflow server is already running from $state_dir (PID $pid); stop it first"
fi
mkdir -p "$state_dir"
chmod 700 "$state_dir"
artifacts=${artifacts:-$state_dir/artifacts}

case "$backend" in
    sqlite) backend_uri="sqlite:///$state_dir/mlflow.db" ;;
    postgresql)
        backend_uri=${MLFLOW_BACKEND_URI:-}
        [[ -n $backend_uri ]] || die "--backend postgresql reads the database URI from MLFLOW_BACKEND_URI, which is not set"
        [[ $backend_uri == postgresql* ]] || die "MLFLOW_BACKEND_URI must be a postgresql:// URI"
        ;;
    *) die "--backend must be sqlite or postgresql, got $backend" ;;
esac

server_env=(
    # mlflow server reads the store from the environment: it stays out of ps and of the log.
    "MLFLOW_BACKEND_STORE_URI=$backend_uri"
    # Small machines: no job-execution workers (see docs/cluster.md).
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false"
    "MLFLOW_DISABLE_TELEMETRY=${MLFLOW_DISABLE_TELEMETRY:-true}"
)
app_args=()
if [[ $basic_auth == true ]]; then
    [[ -n ${MLFLOW_TRACKING_USERNAME:-} ]] || die "--basic-auth needs MLFLOW_TRACKING_USERNAME (the admin user) in the environment"
    password=${MLFLOW_TRACKING_PASSWORD:-}
    ((${#password} >= 12)) ||
        die "--basic-auth needs MLFLOW_TRACKING_PASSWORD (12 characters or more) in the environment"
    python_of_mlflow=$(head -1 "$(command -v "$mlflow_cmd")" | sed -n 's/^#!//p')
    if [[ -n $python_of_mlflow ]] && ! "$python_of_mlflow" -c 'import flask_wtf' 2>/dev/null; then
        die "--basic-auth needs Flask-WTF next to mlflow: pip install 'mlflow[auth]'"
    fi
    # Our own config: the user store lives in the state folder, not in the current folder.
    cat >"$state_dir/basic_auth.ini" <<EOF
[mlflow]
default_permission = READ
database_uri = sqlite:///$state_dir/basic_auth.db
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
    secret_file=$state_dir/flask_secret_key
    if [[ ! -s $secret_file ]]; then
        (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$secret_file")
    fi
    server_env+=(
        "MLFLOW_AUTH_CONFIG_PATH=$state_dir/basic_auth.ini"
        # The admin is created from these the first time (MLflow 3.17 reads them from the env).
        "MLFLOW_AUTH_ADMIN_USERNAME=$MLFLOW_TRACKING_USERNAME"
        "MLFLOW_AUTH_ADMIN_PASSWORD=$MLFLOW_TRACKING_PASSWORD"
        "MLFLOW_FLASK_SERVER_SECRET_KEY=$(<"$secret_file")"
    )
    app_args=(--app-name basic-auth)
fi

# setsid: the server gets its own session and process group, so `stop` can end it and its
# workers by that id. The store URI and the credentials go through the environment only.
env "${server_env[@]}" setsid "$mlflow_cmd" server \
    --host "$host" --port "$port" --workers "$workers" \
    --serve-artifacts --artifacts-destination "$artifacts" \
    "${app_args[@]}" >"$log_file" 2>&1 </dev/null &
pid=$!
echo "$pid" >"$pid_file"

url="http://$host:$port"
[[ $host == 0.0.0.0 ]] && url="http://127.0.0.1:$port"
for _ in $(seq 120); do
    if curl -fsS --max-time 2 "$url/health" >/dev/null 2>&1; then
        echo "MLflow server up: $url (PID $pid, backend $backend, artifacts $artifacts)"
        echo "log: $log_file"
        echo "export MLFLOW_TRACKING_URI=$url"
        exit 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
        rm -f "$pid_file"
        tail -20 "$log_file" >&2
        die "the server exited; log: $log_file"
    fi
    sleep 0.5
done
stop_server >/dev/null
die "no answer on $url/health within 60 s; log: $log_file"
