#!/usr/bin/env bash
# Start a real single-node SLURM cluster on this machine: munged, MariaDB + slurmdbd (submitit polls job
# states with `sacct`, which needs accounting), slurmctld and slurmd, all started as plain daemons because
# CI containers have no systemd. Idempotent: when everything is already up with the same configuration it
# returns within a second. Must run as root.
#
# Environment knobs:
#   SLURM_LOCAL_PARTITION  name of the single (default) partition           [debug]
#   SLURM_LOCAL_STATE      state directory of slurmctld / slurmd             [/var/spool/slurm-local]
#   SLURM_LOCAL_TIMEOUT_S  how long to wait for each daemon and the node     [60]
set -euo pipefail

PARTITION=${SLURM_LOCAL_PARTITION:-debug}
STATE_DIR=${SLURM_LOCAL_STATE:-/var/spool/slurm-local}
TIMEOUT_S=${SLURM_LOCAL_TIMEOUT_S:-60}
RUN_DIR=/run/slurm-local
LOG_DIR=/var/log/slurm-local
CONF_DIR=/etc/slurm
DB_SOCKET=/run/mysqld/mysqld.sock
HOST=$(hostname -s)
PACKAGES=(slurm-wlm slurmdbd munge mariadb-server)

log() { echo "[slurm_start] $*" >&2; }
die() {
  log "ERROR: $*"
  exit 1
}

# True when the pid file names a live process.
pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Poll a command until it succeeds or TIMEOUT_S passes; $1 names what we wait for.
wait_for() {
  local what=$1
  shift
  local deadline=$((SECONDS + TIMEOUT_S))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "timed out after ${TIMEOUT_S}s waiting for $what (logs: $LOG_DIR)"
    sleep 0.5
  done
}

install_packages() {
  local missing=0 cmd
  for cmd in sbatch slurmctld slurmd slurmdbd munged mariadbd; do
    command -v "$cmd" >/dev/null 2>&1 || missing=1
  done
  ((missing)) || return 0
  command -v apt-get >/dev/null || die "SLURM is not installed and apt-get is unavailable; install ${PACKAGES[*]}"
  log "installing ${PACKAGES[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Keep the packages' init scripts from starting daemons before slurm.conf exists (a failed start would
  # fail the install); this script starts them itself.
  local policy=/usr/sbin/policy-rc.d
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
}

ensure_munge_key() {
  local key=/etc/munge/munge.key
  [[ -s $key ]] && return 0
  log "creating munge key"
  install -d -o munge -g munge -m 0700 /etc/munge
  dd if=/dev/urandom of="$key" bs=1 count=1024 status=none
  chown munge:munge "$key"
  chmod 0400 "$key"
}

# slurm.conf for THIS host: `slurmd -C` reports the real CPU layout and memory, so the node never drains
# for claiming more than it has. Memory is consumable (CR_Core_Memory) so mem_gb requests are scheduled.
render_slurm_conf() {
  local node_line hardware cpus mem
  node_line=$(slurmd -C | head -n1)
  hardware=${node_line#NodeName=* }
  cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$node_line")
  mem=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$node_line")
  [[ -n $cpus && -n $mem ]] || die "could not parse 'slurmd -C' output: $node_line"
  cat <<EOF
# Written by scripts/slurm_start.sh for host $HOST; rewritten on every start.
ClusterName=local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/d
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
# No cgroups: processes are tracked by parent pid and tasks are not bound to cores.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$((mem / cpus))
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
JobCompType=jobcomp/none
# submitit requeues pre-empted / timed-out jobs with 'scontrol requeue'. A requeued job waits cred_expire
# seconds (default 120) before it is eligible again, then for the next scheduling pass (default 60 s).
JobRequeue=1
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=2,bf_interval=5
ReturnToService=2
# Short grace periods keep tests quick: SIGKILL follows SIGTERM after 5 s.
KillWait=5
MinJobAge=60
SlurmdTimeout=30
NodeName=$HOST NodeAddr=127.0.0.1 $hardware State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
}

render_slurmdbd_conf() {
  cat <<EOF
# Written by scripts/slurm_start.sh; MariaDB is reached as root over its unix socket (no password).
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=$RUN_DIR/slurmdbd.pid
LogFile=$LOG_DIR/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
EOF
}

# Write $2 (content) to $1 when it differs; prints "changed" if it did.
write_if_changed() {
  local path=$1 content=$2 mode=$3
  if [[ -f $path ]] && [[ "$(cat "$path")" == "$content" ]]; then
    return 0
  fi
  printf '%s\n' "$content" >"$path"
  chmod "$mode" "$path"
  echo changed
}

node_state() { sinfo -h -n "$HOST" -p "$PARTITION" -o %t 2>/dev/null; }

node_ready() {
  case "$(node_state)" in
    idle | mix | alloc | comp) return 0 ;;
    *) return 1 ;;
  esac
}

all_up() {
  pid_alive /run/munge/munged.pid && pid_alive /run/mysqld/mysqld.pid && pid_alive "$RUN_DIR/slurmdbd.pid" &&
    pid_alive "$RUN_DIR/slurmctld.pid" && pid_alive "$RUN_DIR/slurmd.pid" && node_ready
}

start_munge() {
  pid_alive /run/munge/munged.pid && return 0
  log "starting munged"
  install -d -o munge -g munge -m 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged
  wait_for "munged" bash -c 'munge -n | unmunge'
}

start_mariadb() {
  if ! pid_alive /run/mysqld/mysqld.pid; then
    log "starting MariaDB"
    install -d -o mysql -g mysql -m 0755 /run/mysqld
    if [[ ! -d /var/lib/mysql/mysql ]]; then
      mariadb-install-db --user=mysql --datadir=/var/lib/mysql >"$LOG_DIR/mariadb-install.log" 2>&1
    fi
    setsid mariadbd --user=mysql --datadir=/var/lib/mysql --socket="$DB_SOCKET" \
      --pid-file=/run/mysqld/mysqld.pid --skip-networking \
      </dev/null >>"$LOG_DIR/mariadb.log" 2>&1 &
  fi
  wait_for "MariaDB" mariadb-admin --socket="$DB_SOCKET" ping
}

start_slurmdbd() {
  pid_alive "$RUN_DIR/slurmdbd.pid" && return 0
  log "starting slurmdbd"
  slurmdbd
  wait_for "slurmdbd" sacctmgr -n list cluster
}

start_slurmctld() {
  pid_alive "$RUN_DIR/slurmctld.pid" && return 0
  log "starting slurmctld"
  slurmctld
  wait_for "slurmctld" scontrol ping
}

start_slurmd() {
  pid_alive "$RUN_DIR/slurmd.pid" && return 0
  log "starting slurmd"
  slurmd
}

# A node left DOWN or DRAINED by an earlier unclean stop is put back in service.
wait_node_ready() {
  local deadline=$((SECONDS + TIMEOUT_S)) state
  until node_ready; do
    state=$(node_state)
    if [[ $state == down* || $state == drain* ]]; then
      scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
    fi
    ((SECONDS < deadline)) || die "node $HOST is '$state' after ${TIMEOUT_S}s (logs: $LOG_DIR)"
    sleep 0.5
  done
}

# Run one real job and check that accounting (what submitit polls) recorded it.
verify_job() {
  local out job_id host
  out=$(timeout "$TIMEOUT_S" srun -N1 -p "$PARTITION" -t 1 bash -c 'echo "$SLURM_JOB_ID $(hostname -s)"') ||
    die "test job 'srun -N1 hostname' failed: $out"
  read -r job_id host <<<"$out"
  [[ $host == "$HOST" ]] || die "test job ran on '$host', expected '$HOST'"
  wait_for "sacct to record job $job_id" bash -c "sacct -n -X -j $job_id -o State | grep -q COMPLETED"
  log "cluster up: partition '$PARTITION' on $HOST, test job $job_id COMPLETED"
}

main() {
  [[ $(id -u) == 0 ]] || die "must run as root (starts munged, slurmctld and slurmd)"
  install -d -m 0755 "$RUN_DIR" "$LOG_DIR" "$STATE_DIR/ctld" "$STATE_DIR/d" "$CONF_DIR"
  install_packages
  ensure_munge_key

  local slurm_conf dbd_conf changed
  slurm_conf=$(render_slurm_conf)
  dbd_conf=$(render_slurmdbd_conf)
  changed=$(write_if_changed "$CONF_DIR/slurm.conf" "$slurm_conf" 0644)
  changed+=$(write_if_changed "$CONF_DIR/slurmdbd.conf" "$dbd_conf" 0600)
  if [[ -z $changed ]] && all_up; then
    log "already up: partition '$PARTITION' on $HOST"
    return 0
  fi
  if [[ -n $changed ]]; then
    # Daemons read their configuration only at start.
    "$(dirname "${BASH_SOURCE[0]}")/slurm_stop.sh"
  fi

  start_munge
  start_mariadb
  start_slurmdbd
  start_slurmctld
  start_slurmd
  wait_node_ready
  verify_job
}

main "$@"
