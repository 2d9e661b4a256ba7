#!/usr/bin/env bash
# Stop the single-node SLURM cluster started by scripts/slurm_start.sh, newest daemon first. Each daemon is
# stopped through its own pid file, so nothing else on the machine is touched. Jobs still queued survive in
# the state directory and run again after the next start.
set -euo pipefail

RUN_DIR=/run/slurm-local
TIMEOUT_S=${SLURM_LOCAL_TIMEOUT_S:-60}

log() { echo "[slurm_stop] $*" >&2; }

stop_pid() {
  local name=$1 pidfile=$2 pid deadline
  [[ -s $pidfile ]] || return 0
  pid=$(cat "$pidfile")
  kill -0 "$pid" 2>/dev/null || return 0
  log "stopping $name (pid $pid)"
  kill "$pid"
  deadline=$((SECONDS + TIMEOUT_S))
  while kill -0 "$pid" 2>/dev/null; do
    if ((SECONDS >= deadline)); then
      log "$name did not exit after ${TIMEOUT_S}s; sending SIGKILL"
      kill -9 "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.2
  done
}

[[ $(id -u) == 0 ]] || {
  log "ERROR: must run as root"
  exit 1
}
stop_pid slurmd "$RUN_DIR/slurmd.pid"
stop_pid slurmctld "$RUN_DIR/slurmctld.pid"
stop_pid slurmdbd "$RUN_DIR/slurmdbd.pid"
stop_pid MariaDB /run/mysqld/mysqld.pid
stop_pid munged /run/munge/munged.pid
log "stopped"
