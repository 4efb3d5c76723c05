#!/usr/bin/env bash
# A local multi-node Ray cluster: a head node and a worker node on this machine, for
# trying `ray job submit` without a cloud. Token authentication is on, as on a real
# cluster; the token lives in $STATE_DIR/auth_token (mode 600) and is never printed.
#
#   bash cluster/local_cluster.sh start      # head + worker, prints how to submit
#   source .ray-local/env                    # RAY_ADDRESS, RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH
#   ray job submit --working-dir . -- python pipelines/tune.py --budget-minutes 5 --storage "$PWD/runs" \
#       --shared-storage --tracking-uri "sqlite:///$PWD/mlflow.db"     # both nodes share this machine's disk
#   bash cluster/local_cluster.sh stop       # stops both nodes by their own process groups
#
# Settings: STATE_DIR (.ray-local), HEAD_CPUS (1), WORKER_CPUS (1), RAY_PORT (6379),
# DASHBOARD_PORT (8265). The head is started from the project's .venv, so a job's `python`
# is the project's.
set -euo pipefail
cd "$(dirname "$0")/.."
STATE_DIR=${STATE_DIR:-$PWD/.ray-local}
HEAD_CPUS=${HEAD_CPUS:-1}
WORKER_CPUS=${WORKER_CPUS:-1}
RAY_PORT=${RAY_PORT:-6379}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
[ -x .venv/bin/ray ] && export PATH="$PWD/.venv/bin:$PATH"

session_pids() {  # $1: session id. Ray's workers start their own process groups and a
  local pids frontier  # job's driver its own session: the session and all descendants.
  pids=$(pgrep -s "$1" || true)
  frontier=$pids
  while [ -n "$frontier" ]; do
    frontier=$(for p in $frontier; do pgrep -P "$p" || true; done)
    pids="$pids $frontier"
  done
  echo $pids
}

stop_session() {  # $1: pid file of a session leader (setsid): TERM, then KILL what is left
  [ -f "$1" ] || return 0
  local sid signal pids
  sid=$(cat "$1")
  for signal in TERM KILL KILL; do
    pids=$(session_pids "$sid")
    [ -z "$pids" ] && break
    kill -"$signal" $pids 2>/dev/null || true
    for _ in $(seq 20); do
      [ -z "$(session_pids "$sid")" ] && break
      sleep 0.5
    done
  done
  rm -f "$1"
}

start() {
  if [ -f "$STATE_DIR/head.pid" ] && kill -0 "$(cat "$STATE_DIR/head.pid")" 2>/dev/null; then
    echo "error: a local cluster is already running (state in $STATE_DIR); stop it first" >&2; exit 2
  fi
  mkdir -p "$STATE_DIR" && chmod 700 "$STATE_DIR"
  (umask 077 && python -c "import secrets; print(secrets.token_hex(32))" > "$STATE_DIR/auth_token")
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$STATE_DIR/auth_token"
  # One temp dir per node (short: Ray's unix sockets live there). Nodes sharing one would
  # share unpacked job working dirs, and a worker node cleaning up its copy would delete
  # the head's from under a running job. Each node also keeps its own cache of prepared
  # datasets there, as separate machines would, so data is fetched once per node.
  local temp="/tmp/gan-ray-$RAY_PORT"
  # Ray's helpers in the nodes' processes (Train's placement-group cleaner) otherwise look for
  # a Ray on this machine and fail when they find two: this cluster and a local run's.
  export RAY_API_SERVER_ADDRESS="http://127.0.0.1:$DASHBOARD_PORT"
  GAN_DATA_CACHE="$temp/data-cache" setsid ray start --head --block --port "$RAY_PORT" --num-cpus "$HEAD_CPUS" --num-gpus 0 \
    --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" --temp-dir "$temp" \
    --disable-usage-stats >"$STATE_DIR/head.log" 2>&1 &
  echo $! >"$STATE_DIR/head.pid"
  wait_for 1 || { tail -30 "$STATE_DIR/head.log" >&2; stop; exit 1; }
  GAN_DATA_CACHE="$temp-worker/data-cache" setsid ray start --block --address "127.0.0.1:$RAY_PORT" --num-cpus "$WORKER_CPUS" --num-gpus 0 \
    --temp-dir "$temp-worker" --disable-usage-stats >"$STATE_DIR/worker.log" 2>&1 &
  echo $! >"$STATE_DIR/worker.pid"
  wait_for 2 || { tail -30 "$STATE_DIR/worker.log" >&2; stop; exit 1; }
  cat >"$STATE_DIR/env" <<ENV
export RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$STATE_DIR/auth_token
ENV
  echo "local Ray cluster up: head ($HEAD_CPUS CPU) + worker node ($WORKER_CPUS CPU), dashboard http://127.0.0.1:$DASHBOARD_PORT"
  echo "submit:  source $STATE_DIR/env && ray job submit --working-dir . -- python pipelines/tune.py --storage \"\$PWD/runs\" --shared-storage --tracking-uri \"sqlite:///\$PWD/mlflow.db\""
  echo "stop:    bash cluster/local_cluster.sh stop"
}

wait_for() {  # $1: number of alive nodes to wait for (90 s)
  for _ in $(seq 180); do
    if python - "$1" <<PY 2>/dev/null
import sys, ray
ray.init(address="127.0.0.1:$RAY_PORT", logging_level="ERROR", configure_logging=False)
sys.exit(0 if sum(n["Alive"] for n in ray.nodes()) >= int(sys.argv[1]) else 1)
PY
    then return 0; fi
    kill -0 "$(cat "$STATE_DIR/head.pid")" 2>/dev/null || return 1
    sleep 0.5
  done
  return 1
}

stop() {
  stop_session "$STATE_DIR/worker.pid"
  stop_session "$STATE_DIR/head.pid"
  rm -f "$STATE_DIR/env" "$STATE_DIR/auth_token"
  echo "local Ray cluster stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
