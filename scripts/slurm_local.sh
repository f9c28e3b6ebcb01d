#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the tests and for trying `hydra/launcher=slurm`.
#
#   scripts/slurm_local.sh start  DIR   install the packages if missing, write DIR/etc/slurm.conf
#                                       for this host, start munged, slurmctld and slurmd (as root),
#                                       wait until the node is idle
#   scripts/slurm_local.sh status DIR   daemons, partitions, jobs
#   scripts/slurm_local.sh stop   DIR   cancel the cluster's jobs, stop the daemons by their PIDs
#   scripts/slurm_local.sh install      only install the packages if missing (CI does this first)
#
# Then, in the shell that submits:  export SLURM_CONF=DIR/etc/slurm.conf   (or: source DIR/env.sh)
#
# What it sets up: SLURM 22.05 (Debian's slurmctld, slurmd, slurm-client) with munge for
# authentication; one node with this host's CPUs and 90% of its memory; no systemd, no cgroups
# (proctrack/linuxproc, task/none); state, spool, logs, pid files and the munge socket all under
# DIR. Two partitions: `local` (the default) and `urgent` (higher priority: a job there preempts
# and requeues jobs of `local`, as a busy cluster would). A requeued job may start again after
# cred_expire + 1 s: 6 s here (SLURM's default is 120 s). No accounting database: the harness
# reads job states with squeue, not sacct.
#
# Exit codes: 0 ok; 1 usage or a daemon that did not start (its log is printed);
# 3 the packages are missing and cannot be installed (not root, or no package registry).
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge)

usage() { echo "usage: $0 start|stop|status DIR | $0 install" >&2; exit 1; }
[[ $# -eq 2 || ( $# -eq 1 && $1 == install ) ]] || usage
ACTION=$1
DIR=$(mkdir -p "${2:-${TMPDIR:-/tmp}}" && cd "${2:-${TMPDIR:-/tmp}}" && pwd)
CONF=$DIR/etc/slurm.conf
export SLURM_CONF=$CONF
NODE=$(hostname -s)

log() { echo "slurm_local: $*" >&2; }

have_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v munged >/dev/null
}

install_packages() {
    have_packages && return 0
    if [[ $(id -u) -ne 0 ]]; then
        log "the SLURM packages are missing and installing them needs root: run as root, or" \
            "apt-get install --no-install-recommends ${PACKAGES[*]}"
        exit 3
    fi
    log "installing ${PACKAGES[*]} (Debian packages, a few MB)"
    local APT_LOG
    APT_LOG=$(mktemp)
    if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq \
           && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
              "${PACKAGES[@]}"; } >"$DIR/apt.log" 2>&1; then
        log "could not install ${PACKAGES[*]}: $(tail -n 1 "$DIR/apt.log")"
        exit 3
    fi
    have_packages || { log "installed, but slurmctld/slurmd/sbatch/munged are not on PATH"; exit 3; }
}

alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# a TCP port on 127.0.0.1 that nothing listens on, from $1 up
free_port() {
    local p
    for ((p = $1; p < $1 + 200; p++)); do
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return; fi
    done
    log "no free port from $1 to $(($1 + 199))"; exit 1
}

write_config() {
    mkdir -p "$DIR"/{etc,state,spool,log,run,tmp,munge}
    chmod 0755 "$DIR" "$DIR/munge"  # munged wants its socket folder 0755
    if [[ ! -s $DIR/munge/munge.key ]]; then
        dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    fi
    chmod 0400 "$DIR/munge/munge.key"
    # this host as slurmd sees it (CPUs, sockets, cores, threads), 90% of its memory for jobs
    local hw cpus mem_mib
    hw=$(slurmd -C | head -n 1 | sed -e 's/^NodeName=[^ ]* //' -e 's/ RealMemory=[0-9]*//')
    cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
    mem_mib=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
    local ctld_port slurmd_port
    ctld_port=$(free_port 6817)
    slurmd_port=$(free_port $((ctld_port + 1)))
    cat >"$CONF" <<EOF
# Written by scripts/slurm_local.sh for host $NODE: a one-node cluster under $DIR
ClusterName=autogradlab
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job may start again after cred_expire + 1 s (default 120 s; 5 is the least)
AuthInfo=socket=$DIR/munge/munge.socket.2,cred_expire=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
TmpFS=$DIR/tmp
MailProg=/bin/true
# no systemd, no cgroups
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
ReturnToService=2
JobRequeue=1
# after SIGTERM (cancel, requeue, preemption, time limit) a job has KillWait s before SIGKILL
KillWait=15
# a job in a higher-priority partition preempts (and requeues) jobs of a lower one
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
NodeName=$NODE NodeAddr=127.0.0.1 $hw RealMemory=$mem_mib State=UNKNOWN
PartitionName=local Nodes=$NODE Default=YES MaxTime=INFINITE State=UP PriorityTier=1
PartitionName=urgent Nodes=$NODE MaxTime=INFINITE State=UP PriorityTier=10
EOF
    echo "export SLURM_CONF=$CONF" >"$DIR/env.sh"
    log "config: $CONF (node $NODE: $cpus CPUs, ${mem_mib} MiB; ports $ctld_port, $slurmd_port)"
}

wait_for() {  # wait_for SECONDS WHAT COMMAND...
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then log "$what: not ready after ${deadline}s"; return 1; fi
        sleep 0.2
    done
}

fail_with_log() {
    log "$1 did not start; the end of its log:"
    tail -n 20 "$2" >&2 || true
    exit 1
}

node_idle() { [[ $(sinfo -h -n "$NODE" -o %T 2>/dev/null | sort -u) == idle ]]; }

start() {
    install_packages
    if alive "$DIR/run/slurmctld.pid" && alive "$DIR/run/slurmd.pid" && node_idle; then
        log "already running ($DIR)"; echo "export SLURM_CONF=$CONF"; return
    fi
    if [[ $(id -u) -ne 0 ]]; then log "the daemons run as root: run this as root"; exit 1; fi
    stop_daemons
    write_config
    local t0=$SECONDS
    munged --force --socket="$DIR/munge/munge.socket.2" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/munged.seed" || fail_with_log munged "$DIR/log/munged.log"
    wait_for 10 munged test -S "$DIR/munge/munge.socket.2" || fail_with_log munged "$DIR/log/munged.log"
    slurmctld -c -i -f "$CONF" || fail_with_log slurmctld "$DIR/log/slurmctld.log"
    wait_for 30 slurmctld scontrol ping || fail_with_log slurmctld "$DIR/log/slurmctld.log"
    slurmd -f "$CONF" -N "$NODE" || fail_with_log slurmd "$DIR/log/slurmd.log"
    wait_for 60 "node $NODE idle" node_idle || fail_with_log slurmd "$DIR/log/slurmd.log"
    log "up in $((SECONDS - t0)) s: $(sinfo -h -o '%P %a %D %T' | tr '\n' ';')"
    echo "export SLURM_CONF=$CONF"
}

stop_daemons() {
    local name pid pids=()
    for name in slurmd slurmctld munged; do  # the reverse order of start
        if alive "$DIR/run/$name.pid"; then
            pid=$(cat "$DIR/run/$name.pid")
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
        rm -f "$DIR/run/$name.pid"
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
}

stop() {
    if alive "$DIR/run/slurmctld.pid"; then  # jobs first: slurmstepd outlives slurmd
        local jobs
        jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
        if [[ -n ${jobs// /} ]]; then
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            wait_for 20 "jobs ended" bash -c '[[ -z $(squeue -h -t R,CG,S 2>/dev/null) ]]' || true
        fi
    fi
    stop_daemons
    log "stopped ($DIR)"
}

status() {
    local name
    for name in munged slurmctld slurmd; do
        if alive "$DIR/run/$name.pid"; then echo "$name: running (pid $(cat "$DIR/run/$name.pid"))"
        else echo "$name: not running"; fi
    done
    if alive "$DIR/run/slurmctld.pid"; then
        sinfo
        squeue
        echo "export SLURM_CONF=$CONF"
    fi
}

case $ACTION in
    install) install_packages ;;
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) usage ;;
esac
