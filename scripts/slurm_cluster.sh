#!/usr/bin/env bash
# A real two-node SLURM cluster on this machine, for the launcher's live tests.
#
#   scripts/slurm_cluster.sh start    install (apt) what is missing, configure, start, wait
#   scripts/slurm_cluster.sh status   print what runs (daemons, nodes, queue)
#   scripts/slurm_cluster.sh stop     cancel the jobs and stop the SLURM daemons and mariadb
#
# Debian's packages: munge, slurmctld, slurmd (two of them, `slurmd -N n1` and `-N n2`: the
# build has MULTIPLE_SLURMD), slurm-client, slurmdbd with mariadb-server as the accounting
# database that `sacct` reads. Nodes n1 and n2 are 127.0.0.1 with their own slurmd ports;
# their names resolve through /etc/hosts (a line added once). No cgroups:
# proctrack/linuxproc, task/none, select/cons_tres (CR_CPU), JobRequeue=1.
#
# Run as root. Every command is idempotent; `start` returns at once when everything already
# runs. State (configuration copies, spool, logs, the controller's state) lives in
# $PROBSFT_SLURM_STATE (default /var/lib/probsft-slurm); the configuration that the SLURM
# commands read is /etc/slurm/slurm.conf and /etc/slurm/slurmdbd.conf, which this script
# writes only when they are absent or were written by it. Exit codes: 0 ok, 1 a daemon did
# not come up (its log is printed), 2 cannot run here (not root, no apt, foreign config).
set -euo pipefail

STATE=${PROBSFT_SLURM_STATE:-/var/lib/probsft-slurm}
CLUSTER=probsft
ACCOUNT=probsft
PARTITION=cpu
CTLD_PORT=6817
DBD_PORT=6819
NODE_PORTS=(17001 17002)
NODES=(n1 n2)
CPUS_PER_NODE=4          # more than the cores: several small test jobs may share a node
MARK="# written by probsft-megatron scripts/slurm_cluster.sh"
SLURM_CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)

say() { echo "slurm_cluster: $*"; }
die() { echo "slurm_cluster: error: $1" >&2; exit "${2:-1}"; }

# pid_alive PIDFILE: the pid in PIDFILE runs and is the daemon the file is named after (a pid
# file left by a killed daemon may name a pid that another process has since taken)
pid_alive() {
    [[ -s $1 ]] || return 1
    local pid name
    pid=$(cat "$1" 2>/dev/null) || return 1
    name=$(basename "$1" .pid); name=${name%%-*}
    kill -0 "$pid" 2>/dev/null && grep -q "^$name" "/proc/$pid/comm" 2>/dev/null
}

wait_for() {  # wait_for SECONDS WHAT LOGFILE CMD...
    local limit=$1 what=$2 log=$3; shift 3
    local t=0
    until "$@" >/dev/null 2>&1; do
        if (( t >= limit * 5 )); then
            echo "slurm_cluster: error: $what did not come up within ${limit}s" >&2
            [[ -f $log ]] && { echo "--- last lines of $log" >&2; tail -n 20 "$log" >&2; }
            exit 1
        fi
        sleep 0.2; t=$((t + 1))
    done
}

need_root() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and starts daemons)" 2
}

# ------------------------------------------------------------------ installation
install_packages() {
    local missing=()
    command -v munged >/dev/null || missing+=(munge)
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v slurmdbd >/dev/null || missing+=(slurmdbd)
    command -v mariadbd >/dev/null || missing+=(mariadb-server)
    (( ${#missing[@]} == 0 )) && return 0
    command -v apt-get >/dev/null || die "apt-get not found; install ${missing[*]} by hand" 2
    say "installing ${missing[*]} (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >"$STATE/log/apt.log" 2>&1 || true
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >>"$STATE/log/apt.log" 2>&1 \
        || { tail -n 20 "$STATE/log/apt.log" >&2; die "apt-get install ${PACKAGES[*]} failed" 2; }
}

# ------------------------------------------------------------------ configuration
write_if_changed() {  # write_if_changed PATH MODE CONTENT -> 0 when the file changed
    local path=$1 mode=$2 content=$3
    if [[ -f $path ]] && [[ "$(cat "$path")" == "$content" ]]; then return 1; fi
    if [[ -f $path ]] && ! grep -qF "$MARK" "$path"; then
        die "$path exists and was not written by this script; move it away to use the test cluster" 2
    fi
    local tmp
    tmp=$(mktemp "$path.XXXXXX")
    printf '%s\n' "$content" >"$tmp"
    chmod "$mode" "$tmp"
    mv -f "$tmp" "$path"
    return 0
}

ensure_hosts() {
    local n missing=()
    for n in "${NODES[@]}"; do
        [[ "$(getent ahostsv4 "$n" 2>/dev/null | awk 'NR==1{print $1}')" == 127.0.0.1 ]] || missing+=("$n")
    done
    (( ${#missing[@]} == 0 )) && return 0
    say "adding ${missing[*]} to /etc/hosts (127.0.0.1)"
    printf '127.0.0.1 %s  %s\n' "${missing[*]}" "$MARK" >>/etc/hosts \
        || die "cannot append to /etc/hosts; add '127.0.0.1 ${missing[*]}' to it by hand" 2
}

slurm_conf() {
    local host i
    host=$(hostname -s)
    cat <<EOF
$MARK
# A two-node test cluster on one machine; see docs/launchers.md ("Testing against a real SLURM").
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job may start again after cred_expire seconds (default 120)
AuthInfo=cred_expire=30
CryptoType=crypto/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd-%n
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
JobRequeue=1
KillWait=30
InactiveLimit=0
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=60
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
JobCompType=jobcomp/none
EOF
    for i in "${!NODES[@]}"; do
        echo "NodeName=${NODES[$i]} NodeHostname=localhost NodeAddr=127.0.0.1 Port=${NODE_PORTS[$i]} CPUs=$CPUS_PER_NODE State=UNKNOWN"
    done
    local IFS=,
    echo "PartitionName=$PARTITION Nodes=${NODES[*]} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES"
}

dbd_conf() {
    cat <<EOF
$MARK
AuthType=auth/munge
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$(cat "$STATE/etc/dbpass")
StorageLoc=slurm_acct_db
EOF
}

# ------------------------------------------------------------------ daemons
mysql_ok() { mariadb-admin --connect-timeout=2 ping; }
munge_ok() { munge -n | unmunge; }
dbd_ok() { sacctmgr -n -P list cluster format=cluster; }
ctld_ok() { scontrol ping | grep -q "is UP"; }
slurmd_ok() { pid_alive "$STATE/run/slurmd-$1.pid"; }
nodes_ready() {  # both nodes answer (idle, or busy with jobs)
    local states
    states=$(sinfo -h -N -p "$PARTITION" -o '%N %T' 2>/dev/null | sort -u)
    local n
    for n in "${NODES[@]}"; do
        grep -Eq "^$n (idle|mixed|allocated|completing)$" <<<"$states" || return 1
    done
}

start_munge() {
    munge_ok >/dev/null 2>&1 && return 0
    say "starting munged"
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 0755 /run/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
    fi
    runuser -u munge -- /usr/sbin/munged
    wait_for 20 munged /var/log/munge/munged.log munge_ok
}

start_mariadb() {
    mysql_ok >/dev/null 2>&1 && return 0
    say "starting mariadb"
    mkdir -p /run/mysqld
    chown mysql:mysql /run/mysqld
    if [[ ! -d /var/lib/mysql/mysql ]]; then
        mariadb-install-db --user=mysql --datadir=/var/lib/mysql >"$STATE/log/mariadb-install.log" 2>&1
    fi
    setsid nohup /usr/sbin/mariadbd --user=mysql --bind-address=127.0.0.1 \
        >"$STATE/log/mariadb.log" 2>&1 </dev/null &
    wait_for 60 mariadb "$STATE/log/mariadb.log" mysql_ok
}

ensure_database() {
    local pass
    pass=$(cat "$STATE/etc/dbpass")
    mariadb -u root <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$pass';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$pass';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF
}

start_slurmdbd() {
    pid_alive "$STATE/run/slurmdbd.pid" && dbd_ok >/dev/null 2>&1 && return 0
    say "starting slurmdbd"
    slurmdbd
    wait_for 60 slurmdbd "$STATE/log/slurmdbd.log" dbd_ok
}

ensure_accounting() {
    if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
        sacctmgr -i add cluster "$CLUSTER" >/dev/null
    fi
    if ! sacctmgr -n -P list account format=account | grep -qx "$ACCOUNT"; then
        sacctmgr -i add account "$ACCOUNT" Cluster="$CLUSTER" Description="probsft tests" \
            Organization=probsft >/dev/null
    fi
    if ! sacctmgr -n -P list user format=user | grep -qx root; then
        sacctmgr -i add user root Account="$ACCOUNT" Cluster="$CLUSTER" >/dev/null
    fi
}

start_slurmctld() {
    pid_alive "$STATE/run/slurmctld.pid" && ctld_ok && return 0
    say "starting slurmctld"
    slurmctld
    wait_for 60 slurmctld "$STATE/log/slurmctld.log" ctld_ok
}

start_slurmds() {
    local n
    for n in "${NODES[@]}"; do
        slurmd_ok "$n" && continue
        say "starting slurmd -N $n"
        slurmd -N "$n"
    done
    local t=0
    until nodes_ready; do
        if (( t >= 300 )); then
            sinfo -N >&2 || true
            for n in "${NODES[@]}"; do
                echo "--- last lines of $STATE/log/slurmd-$n.log" >&2
                tail -n 10 "$STATE/log/slurmd-$n.log" >&2 || true
            done
            die "nodes ${NODES[*]} are not idle after 60s"
        fi
        # a node left down or drained by an earlier stop comes back here
        if (( t % 25 == 24 )); then
            scontrol update nodename="$(IFS=,; echo "${NODES[*]}")" state=resume >/dev/null 2>&1 || true
        fi
        sleep 0.2; t=$((t + 1))
    done
}

stop_pidfile() {  # stop_pidfile NAME PIDFILE
    local name=$1 pidfile=$2 t=0
    pid_alive "$pidfile" || return 0
    say "stopping $name"
    kill "$(cat "$pidfile")" 2>/dev/null || true
    while pid_alive "$pidfile" && (( t < 100 )); do sleep 0.2; t=$((t + 1)); done
    if pid_alive "$pidfile"; then kill -9 "$(cat "$pidfile")" 2>/dev/null || true; fi
}

# ------------------------------------------------------------------ commands
cmd_start() {
    need_root
    mkdir -p "$STATE"/{etc,run,log,ctld}
    if all_up; then
        say "already running (nodes ${NODES[*]} ready)"
        return 0
    fi
    install_packages
    ensure_hosts
    [[ -s $STATE/etc/dbpass ]] || (umask 077; head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$STATE/etc/dbpass")
    mkdir -p /etc/slurm
    local changed=0
    write_if_changed "$SLURM_CONF" 644 "$(slurm_conf)" && changed=1
    write_if_changed "$DBD_CONF" 600 "$(dbd_conf)" && changed=1
    if (( changed )); then  # daemons of an older configuration restart with the new one
        stop_slurm_daemons
    fi
    local n
    for n in "${NODES[@]}"; do mkdir -p "$STATE/slurmd-$n"; done
    start_munge
    start_mariadb
    ensure_database
    start_slurmdbd
    ensure_accounting
    start_slurmctld
    start_slurmds
    say "running: cluster $CLUSTER, partition $PARTITION, nodes ${NODES[*]}, account $ACCOUNT"
}

all_up() {
    [[ -f $SLURM_CONF ]] && grep -qF "$MARK" "$SLURM_CONF" || return 1
    [[ "$(cat "$SLURM_CONF")" == "$(slurm_conf)" ]] || return 1
    pid_alive "$STATE/run/slurmdbd.pid" && pid_alive "$STATE/run/slurmctld.pid" || return 1
    local n
    for n in "${NODES[@]}"; do slurmd_ok "$n" || return 1; done
    munge_ok >/dev/null 2>&1 && nodes_ready && dbd_ok >/dev/null 2>&1
}

stop_slurm_daemons() {
    local n
    for n in "${NODES[@]}"; do stop_pidfile "slurmd -N $n" "$STATE/run/slurmd-$n.pid"; done
    stop_pidfile slurmctld "$STATE/run/slurmctld.pid"
    stop_pidfile slurmdbd "$STATE/run/slurmdbd.pid"
}

cmd_stop() {
    need_root
    if [[ -f $SLURM_CONF ]] && grep -qF "$MARK" "$SLURM_CONF" && pid_alive "$STATE/run/slurmctld.pid"; then
        local jobs
        jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
        if [[ -n ${jobs// } ]]; then
            say "cancelling jobs $jobs"
            # shellcheck disable=SC2086
            scancel $jobs || true
            sleep 2
        fi
    fi
    stop_slurm_daemons
    if [[ -s /run/mysqld/mysqld.pid ]] && mysql_ok >/dev/null 2>&1; then
        say "stopping mariadb"
        mariadb-admin shutdown || true
    fi
    say "stopped (munged is left running; state kept in $STATE)"
}

cmd_status() {
    local rc=0 name pidfile n
    for entry in "slurmdbd:$STATE/run/slurmdbd.pid" "slurmctld:$STATE/run/slurmctld.pid" \
                 "slurmd -N n1:$STATE/run/slurmd-n1.pid" "slurmd -N n2:$STATE/run/slurmd-n2.pid"; do
        name=${entry%%:*}; pidfile=${entry#*:}
        if pid_alive "$pidfile"; then echo "$name: running (pid $(cat "$pidfile"))"
        else echo "$name: not running"; rc=3; fi
    done
    if munge_ok >/dev/null 2>&1; then echo "munged: running"; else echo "munged: not running"; rc=3; fi
    if mysql_ok >/dev/null 2>&1; then echo "mariadb: running"; else echo "mariadb: not running"; rc=3; fi
    if ctld_ok 2>/dev/null; then
        sinfo -N -o '%N %P %T %c' || true
        echo "jobs in queue: $(squeue -h 2>/dev/null | wc -l)"
    fi
    echo "state: $STATE; config: $SLURM_CONF"
    return $rc
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
