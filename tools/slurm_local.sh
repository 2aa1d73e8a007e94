#!/usr/bin/env bash
# A real one-host SLURM cluster for the test suite and CI: Debian's slurm-wlm + munge (+ slurmdbd
# on MariaDB for sacct), started without systemd as plain background daemons, every config,
# socket, database, log and pid file under one directory.
#
#   tools/slurm_local.sh start    install the packages if missing, write the config, start the
#                                 daemons, wait until the node is idle (no-op when already up)
#   tools/slurm_local.sh stop     cancel its jobs, stop exactly the daemons its pid files name,
#                                 remove its state (logs are kept under $DIR/log)
#   tools/slurm_local.sh status   daemons and sinfo; exit 0 when the cluster answers
#   tools/slurm_local.sh env      print `export SLURM_CONF=...` for a shell (eval "$(... env)")
#
# Needs root (slurmd runs jobs as their submitter; CI runs as root). Settings, from the
# environment:
#   GPUENGINE_SLURM_DIR         state directory                          [/tmp/gpuengine-slurm]
#   GPUENGINE_SLURM_CPUS        CPUs the node offers                     [nproc]
#   GPUENGINE_SLURM_GPUS        fake gres/gpu count (0 = no gres)         [2]
#   GPUENGINE_SLURM_ACCOUNTING  1: slurmdbd + MariaDB so sacct works     [1]
#   GPUENGINE_SLURM_PORT        slurmctld port; slurmd +1, slurmdbd +2, MariaDB +3   [6817]
#   GPUENGINE_SLURM_TIMEOUT     seconds to wait for each daemon          [60]
#
# The node (named after `hostname -s`) is the one partition `local`, the default. Jobs get a
# per-job node-local $TMPDIR ($DIR/tmp/job_<id>: prolog creates it, epilog removes it) as most
# clusters give. The fake GPUs are links to /dev/null: `--gres=gpu:K` / `--gpus-per-node=K`
# (K <= GPUS) are accepted and set CUDA_VISIBLE_DEVICES, more is refused at submission.
# Finished jobs stay in squeue/scontrol for MinJobAge=3600 s and in sacct until stop. The config
# is $DIR/slurm.conf; when /etc/slurm/slurm.conf does not exist, start links it there so plain
# `sbatch` finds it (stop removes that link); otherwise set SLURM_CONF (see `env`).
set -euo pipefail

DIR=${GPUENGINE_SLURM_DIR:-/tmp/gpuengine-slurm}
CPUS=${GPUENGINE_SLURM_CPUS:-$(nproc)}
GPUS=${GPUENGINE_SLURM_GPUS:-2}
ACCOUNTING=${GPUENGINE_SLURM_ACCOUNTING:-1}
PORT=${GPUENGINE_SLURM_PORT:-6817}
TIMEOUT=${GPUENGINE_SLURM_TIMEOUT:-60}
NODE=$(hostname -s)
CONF=$DIR/slurm.conf
ETC_CONF=/etc/slurm/slurm.conf
MUNGE_SOCKET=$DIR/munge/munge.socket.2
DB_PORT=$((PORT + 3))
export SLURM_CONF=$CONF

log() { echo "slurm_local: $*" >&2; }
die() { log "error: $*"; exit 1; }

install_packages() {
    local wanted=(slurmctld slurmd slurm-client munge) missing=() p rc=0
    [ "$ACCOUNTING" = 1 ] && wanted+=(slurmdbd mariadb-server)
    for p in "${wanted[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
    log "installing ${missing[*]} (log: $DIR/log/apt.log)"
    # Keep the packages' init scripts from starting the distribution's own daemons.
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && made_policy=1
    fi
    local apt=(apt-get install -y -q --no-install-recommends -o Dpkg::Use-Pty=0)
    export DEBIAN_FRONTEND=noninteractive
    "${apt[@]}" "${missing[@]}" >"$DIR/log/apt.log" 2>&1 || {
        apt-get update -q >>"$DIR/log/apt.log" 2>&1 || true
        "${apt[@]}" "${missing[@]}" >>"$DIR/log/apt.log" 2>&1 || rc=$?
    }
    [ $made_policy = 1 ] && rm -f "$policy"
    if [ $rc -ne 0 ]; then
        tail -n 20 "$DIR/log/apt.log" >&2
        die "apt-get install ${missing[*]} failed"
    fi
}

# pid of daemon $1 from $DIR/run/$1.pid when that process is alive and is that daemon, else "".
live_pid() {
    local pidfile=$DIR/run/$1.pid pid
    [ -s "$pidfile" ] || return 0
    pid=$(tr -dc 0-9 <"$pidfile")
    [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 0
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "$1" && echo "$pid"
    return 0
}

# Wait until command "$2..." succeeds; $1 names the daemon (and its log) for the error.
wait_for() {
    local name=$1 deadline=$((SECONDS + TIMEOUT)) problem=""; shift
    until "$@" >/dev/null 2>&1; do
        if [ $SECONDS -ge $deadline ]; then problem="not answering after ${TIMEOUT}s"
        elif [ -e "$DIR/run/$name.pid" ] && [ -z "$(live_pid "$name")" ]; then problem="exited"
        fi
        if [ -n "$problem" ]; then
            tail -n 5 "$DIR/log/$name.log" >&2 || true
            die "$name $problem; see $DIR/log/$name.log"
        fi
        sleep 0.2
    done
}

write_config() {
    local mem gres_types="" gres="" accounting i
    mem=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    if [ "$GPUS" -gt 0 ]; then gres_types="GresTypes=gpu"; gres="Gres=gpu:$GPUS"; fi
    if [ "$ACCOUNTING" = 1 ]; then
        accounting="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$((PORT + 2))
AccountingStoragePass=$MUNGE_SOCKET
JobAcctGatherType=jobacct_gather/linux"
    else
        accounting="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
    fi
    cat >"$CONF" <<EOF
# Written by tools/slurm_local.sh: one node, no systemd, no cgroups.
ClusterName=gpuengine
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
$accounting
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
MinJobAge=3600
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
Prolog=$DIR/prolog.sh
Epilog=$DIR/epilog.sh
TaskProlog=$DIR/task_prolog.sh
$gres_types
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$mem $gres State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    # slurmd drops a gres/gpu without device files; links to /dev/null pass its check.
    : >"$DIR/gres.conf"
    if [ "$GPUS" -gt 0 ]; then
        mkdir -p "$DIR/dev"
        for ((i = 0; i < GPUS; i++)); do ln -sfn /dev/null "$DIR/dev/gpu$i"; done
        echo "NodeName=$NODE Name=gpu File=$DIR/dev/gpu[0-$((GPUS - 1))]" >"$DIR/gres.conf"
    fi
    printf '#!/bin/sh\nmkdir -p "%s/tmp/job_$SLURM_JOB_ID"\n' "$DIR" >"$DIR/prolog.sh"
    printf '#!/bin/sh\nrm -rf "%s/tmp/job_$SLURM_JOB_ID"\n' "$DIR" >"$DIR/epilog.sh"
    printf '#!/bin/sh\necho "export TMPDIR=%s/tmp/job_$SLURM_JOB_ID"\n' "$DIR" \
        >"$DIR/task_prolog.sh"
    chmod 755 "$DIR/prolog.sh" "$DIR/epilog.sh" "$DIR/task_prolog.sh"
}

start_munge() {
    [ -n "$(live_pid munged)" ] && return 0
    mkdir -p "$DIR/munge" && chmod 755 "$DIR/munge"
    if [ ! -s "$DIR/munge/munge.key" ]; then
        if command -v mungekey >/dev/null; then mungekey --create --keyfile="$DIR/munge/munge.key"
        else dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none; fi
        chmod 400 "$DIR/munge/munge.key"
    fi
    : >"$DIR/log/munged.log"
    munged --key-file="$DIR/munge/munge.key" --socket="$MUNGE_SOCKET" \
        --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/munged.seed" --force \
        || die "munged did not start; see $DIR/log/munged.log"
}

mariadb_answers() { mariadb --no-defaults -S "$DIR/mysql/mysqld.sock" -u root -e 'select 1'; }

start_mariadb() {
    [ -n "$(live_pid mariadbd)" ] && return 0
    if [ ! -d "$DIR/mysql/data/mysql" ]; then
        mkdir -p "$DIR/mysql"
        mariadb-install-db --no-defaults --datadir="$DIR/mysql/data" --user=root --skip-test-db \
            --auth-root-authentication-method=socket >"$DIR/log/mariadbd.log" 2>&1 \
            || die "mariadb-install-db failed; see $DIR/log/mariadbd.log"
    fi
    # Its own session, so that signals to the caller's process group do not reach it.
    setsid mariadbd --no-defaults --datadir="$DIR/mysql/data" --user=root \
        --socket="$DIR/mysql/mysqld.sock" --port=$DB_PORT --bind-address=127.0.0.1 \
        --pid-file="$DIR/run/mariadbd.pid" --log-error="$DIR/log/mariadbd.log" \
        --skip-name-resolve --innodb-buffer-pool-size=64M </dev/null >/dev/null 2>&1 &
    echo $! >"$DIR/run/mariadbd.pid"
    wait_for mariadbd mariadb_answers
    mariadb --no-defaults -S "$DIR/mysql/mysqld.sock" -u root -e "
        CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
}

start_slurmdbd() {
    [ -n "$(live_pid slurmdbd)" ] && return 0
    cat >"$DIR/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdAddr=127.0.0.1
DbdHost=$NODE
DbdPort=$((PORT + 2))
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$DIR/slurmdbd.conf"  # slurmdbd refuses a readable one (it holds a password)
    : >"$DIR/log/slurmdbd.log"
    slurmdbd || die "slurmdbd did not start; see $DIR/log/slurmdbd.log"
    wait_for slurmdbd sacctmgr -n show cluster
    sacctmgr -n -P show cluster format=cluster | grep -qx gpuengine \
        || sacctmgr -i add cluster gpuengine >/dev/null
}

cluster_answers() { timeout 10 sinfo -h >/dev/null 2>&1; }

wait_idle() {
    local deadline=$((SECONDS + TIMEOUT)) state="" reason
    while [ $SECONDS -lt $deadline ]; do
        state=$(timeout 10 sinfo -h -N -n "$NODE" -o %T 2>/dev/null || true)
        case $state in
            idle|mixed|allocated) return 0 ;;
            *drain*|*inval*)
                reason=$(scontrol show node "$NODE" | sed -n 's/^ *Reason=//p')
                die "node $NODE is $state: ${reason:-no reason}; see $DIR/log/slurmd.log" ;;
        esac
        [ -n "$(live_pid slurmctld)" ] || die "slurmctld exited; see $DIR/log/slurmctld.log"
        [ -n "$(live_pid slurmd)" ] || die "slurmd exited; see $DIR/log/slurmd.log"
        sleep 0.2
    done
    tail -n 5 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
    die "node $NODE not idle after ${TIMEOUT}s (state '${state:-no answer}')"
}

link_etc_conf() {
    if [ ! -e "$ETC_CONF" ] && [ ! -L "$ETC_CONF" ]; then
        mkdir -p "$(dirname "$ETC_CONF")" && ln -s "$CONF" "$ETC_CONF"
    fi
}

cmd_start() {
    [ "$(id -u)" -eq 0 ] || die "needs root (slurmd runs jobs as their submitting user)"
    if [ -n "$(live_pid slurmctld)" ] && [ -n "$(live_pid slurmd)" ] && cluster_answers; then
        log "already running ($DIR)"; link_etc_conf; return 0
    fi
    trap 'log "start failed; stopping what it started"; cmd_stop' EXIT
    mkdir -p "$DIR" && chmod 755 "$DIR"
    mkdir -p "$DIR/log" "$DIR/run" "$DIR/ctld" "$DIR/spool" "$DIR/tmp"
    chmod 1777 "$DIR/tmp"
    install_packages
    write_config
    start_munge
    if [ "$ACCOUNTING" = 1 ]; then start_mariadb; start_slurmdbd; fi
    if [ -z "$(live_pid slurmctld)" ]; then
        : >"$DIR/log/slurmctld.log"
        slurmctld -c -f "$CONF" || die "slurmctld did not start; see $DIR/log/slurmctld.log"
    fi
    if [ -z "$(live_pid slurmd)" ]; then
        : >"$DIR/log/slurmd.log"
        slurmd -f "$CONF" -N "$NODE" || die "slurmd did not start; see $DIR/log/slurmd.log"
    fi
    link_etc_conf
    wait_idle
    trap - EXIT
    log "up: node $NODE, $CPUS CPUs, $GPUS fake GPUs, partition local," \
        "accounting=$ACCOUNTING, SLURM_CONF=$CONF"
}

# SIGTERM the named daemons (those whose pid files point at them), wait, SIGKILL stragglers.
stop_daemons() {
    local name pid pids=() i
    for name in "$@"; do
        pid=$(live_pid "$name")
        [ -n "$pid" ] && kill "$pid" 2>/dev/null && pids+=("$pid")
        rm -f "$DIR/run/$name.pid"
    done
    for pid in "${pids[@]}"; do
        for i in $(seq 60); do [ -d "/proc/$pid" ] || break; sleep 0.25; done
        if [ -d "/proc/$pid" ]; then
            log "pid $pid ignored SIGTERM, killing"
            kill -9 "$pid" || true
        fi
    done
}

cmd_stop() {
    local i
    if [ -n "$(live_pid slurmctld)" ] && cluster_answers; then
        scancel --full --partition=local 2>/dev/null || true
        for i in $(seq 40); do
            [ -z "$(squeue -h -t RUNNING,COMPLETING,CONFIGURING -o %i 2>/dev/null)" ] && break
            sleep 0.25
        done
    fi
    stop_daemons slurmd slurmctld
    stop_daemons slurmdbd
    stop_daemons mariadbd munged
    if [ -L "$ETC_CONF" ] && [ "$(readlink "$ETC_CONF")" = "$CONF" ]; then rm -f "$ETC_CONF"; fi
    if [ -d "$DIR" ]; then
        rm -rf "$DIR/ctld" "$DIR/spool" "$DIR/tmp" "$DIR/munge" "$DIR/run" "$DIR/dev" "$DIR/mysql"
        rm -f "$DIR"/*.sh "$DIR"/*.conf
    fi
    log "stopped ($DIR; logs kept in $DIR/log)"
}

cmd_status() {
    local name rc=0
    for name in munged mariadbd slurmdbd slurmctld slurmd; do
        printf '%-10s %s\n' "$name" "$(live_pid "$name" | sed 's/^/pid /')"
    done
    if cluster_answers; then sinfo; else echo "cluster does not answer ($CONF)"; rc=1; fi
    return $rc
}

case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
