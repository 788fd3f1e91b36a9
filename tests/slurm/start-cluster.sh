#!/usr/bin/env bash
# Start a single-node Slurm 22.05 test cluster on loopback (munged, MariaDB, slurmdbd, slurmctld, slurmd)
# with two fake GPUs and job accounting (sacct works). DEEPNOISE_SLURM_ACCOUNTING=0: no MariaDB/slurmdbd.
#
#   tests/slurm/start-cluster.sh STATE_DIR
#
# Needs root (daemons run as root/munge, config must live at /etc/slurm because the executor plugin's
# job step drops SLURM_CONF). Installs the Debian packages when the binaries are missing (unless
# DEEPNOISE_SLURM_NO_INSTALL=1). State, spool, logs and the job completion log go under STATE_DIR; the PIDs
# of the daemons started here are written to STATE_DIR/pids, which stop-cluster.sh reads to stop exactly
# those processes. Exits non-zero with a message on any problem.
set -euo pipefail

die() { echo "start-cluster: $*" >&2; exit 1; }

[[ $# -eq 1 ]] || die "usage: $0 STATE_DIR"
[[ $(id -u) -eq 0 ]] || die "must run as root (installs packages, starts munged/slurmctld/slurmd, writes /etc/slurm)"
here=$(cd "$(dirname "$0")" && pwd)
state=$(mkdir -p "$1" && cd "$1" && pwd)
conf_dir=/etc/slurm
marker="deepnoise-test-cluster"
: "${DEEPNOISE_SLURM_CPUS:=32}" "${DEEPNOISE_SLURM_MEM_MB:=256000}"
: "${DEEPNOISE_SLURM_CTLD_PORT:=6817}" "${DEEPNOISE_SLURM_SLURMD_PORT:=6818}" "${DEEPNOISE_SLURM_DBD_PORT:=6819}"
: "${DEEPNOISE_SLURM_ACCOUNTING:=1}"
accounting=$DEEPNOISE_SLURM_ACCOUNTING
# the client library's default socket: slurmdbd (StorageHost=localhost) has no setting for another one
db_socket=/run/mysqld/mysqld.sock

# --- packages ---------------------------------------------------------------------------------------
missing=()
bins=(munged slurmctld slurmd sbatch squeue scontrol sacct)
pkgs=(slurmctld slurmd slurm-client munge)
if [[ $accounting == 1 ]]; then
    bins+=(slurmdbd sacctmgr mariadbd mariadb-install-db)
    pkgs+=(slurmdbd mariadb-server)
fi
for bin in "${bins[@]}"; do
    command -v "$bin" >/dev/null || missing+=("$bin")
done
if ((${#missing[@]})); then
    [[ ${DEEPNOISE_SLURM_NO_INSTALL:-0} == 1 ]] && die "missing ${missing[*]} and DEEPNOISE_SLURM_NO_INSTALL=1"
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install ${pkgs[*]}"
    echo "start-cluster: installing ${pkgs[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >"$state/apt.log" 2>&1 || { cat "$state/apt.log" >&2; die "apt-get update failed"; }
    apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >>"$state/apt.log" 2>&1 \
        || { tail -20 "$state/apt.log" >&2; die "apt-get install failed"; }
fi

# --- refuse to clobber a cluster that is not ours ------------------------------------------------------
if [[ -e $conf_dir/slurm.conf ]] && ! grep -q "$marker" "$conf_dir/slurm.conf"; then
    die "$conf_dir/slurm.conf exists and was not written by this script; refusing to overwrite it"
fi
if [[ $accounting == 1 && -e $db_socket ]]; then
    die "$db_socket exists (a MariaDB/MySQL server running?); slurmdbd can only reach the default socket"
fi
for port in "$DEEPNOISE_SLURM_CTLD_PORT" "$DEEPNOISE_SLURM_SLURMD_PORT" "$DEEPNOISE_SLURM_DBD_PORT"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        die "port $port on 127.0.0.1 is in use (another slurmctld/slurmd running? stop it first)"
    fi
done

# --- configuration ------------------------------------------------------------------------------------
host=$(hostname -s)
mkdir -p "$state"/{ctld,slurmd,log,dev} "$conf_dir"
ln -sfn /dev/null "$state/dev/fakegpu0"
ln -sfn /dev/null "$state/dev/fakegpu1"
if [[ $accounting == 1 ]]; then
    acct="AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=$host"
    acct+="\nAccountingStoragePort=$DEEPNOISE_SLURM_DBD_PORT\nAccountingStorageTRES=gres/gpu"
else
    acct="AccountingStorageType=accounting_storage/none"
fi
render() {
    sed -e "s|@HOST@|$host|g" -e "s|@STATE@|$state|g" -e "s|@CPUS@|$DEEPNOISE_SLURM_CPUS|g" \
        -e "s|@ACCOUNTING@|$acct|" -e "s|@DBD_PORT@|$DEEPNOISE_SLURM_DBD_PORT|g" \
        -e "s|@MEM_MB@|$DEEPNOISE_SLURM_MEM_MB|g" -e "s|@CTLD_PORT@|$DEEPNOISE_SLURM_CTLD_PORT|g" \
        -e "s|@SLURMD_PORT@|$DEEPNOISE_SLURM_SLURMD_PORT|g" "$1"
}
render "$here/slurm.conf.in" >"$conf_dir/slurm.conf"
render "$here/gres.conf.in" >"$conf_dir/gres.conf"
if [[ $accounting == 1 ]]; then
    render "$here/slurmdbd.conf.in" >"$conf_dir/slurmdbd.conf"
    chmod 600 "$conf_dir/slurmdbd.conf"
fi
: >"$state/pids"

# --- munge --------------------------------------------------------------------------------------------
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    echo "start-cluster: using the munged that is already running" >&2
else
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    [[ -s /etc/munge/munge.key ]] || runuser -u munge -- mungekey --create
    rm -f /run/munge/munged.pid
    runuser -u munge -- munged --force
    for _ in $(seq 50); do [[ -s /run/munge/munged.pid ]] && break; sleep 0.1; done
    [[ -s /run/munge/munged.pid ]] || die "munged did not start (see /var/log/munge/munged.log)"
    echo "munged $(cat /run/munge/munged.pid)" >>"$state/pids"
    munge -n | unmunge >/dev/null || die "munge does not work"
fi

# --- slurmctld and slurmd -----------------------------------------------------------------------------
start_daemon() { # name pidfile args...
    local name=$1 pidfile=$2
    shift 2
    "$name" "$@" || die "$name failed to start (see $state/log/$name.log)"
    for _ in $(seq 100); do [[ -s $pidfile ]] && break; sleep 0.1; done
    [[ -s $pidfile ]] || die "$name wrote no pid file (see $state/log/$name.log)"
    echo "$name $(cat "$pidfile")" >>"$state/pids"
}
# --- MariaDB (socket only) and slurmdbd ----------------------------------------------------------------
if [[ $accounting == 1 ]]; then
    # its own directory under /tmp: STATE_DIR may sit below a directory the mysql user cannot enter
    # (pytest's /tmp/pytest-of-root is 0700); stop-cluster.sh removes it
    db=$(mktemp -d /tmp/deepnoise-test-mariadb.XXXXXX)
    echo "$db" >"$state/mariadb-dir"
    chown mysql:mysql "$db"
    install -d -o mysql -g mysql -m 0750 "$db/data"
    install -d -o mysql -g mysql -m 0755 /run/mysqld
    mariadb-install-db --user=mysql --datadir="$db/data" --auth-root-authentication-method=socket \
        --skip-test-db >"$state/log/mariadb-install.log" 2>&1 \
        || { tail -20 "$state/log/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
    # --no-defaults: nothing from /etc/mysql (no port, no bind address); the server is reachable only
    # through its socket
    runuser -u mysql -- mariadbd --no-defaults --datadir="$db/data" --socket="$db_socket" \
        --skip-networking --pid-file="$db/mariadbd.pid" --log-error="$db/mariadbd.log" \
        --innodb-buffer-pool-size=64M --innodb-log-file-size=16M </dev/null >/dev/null 2>&1 &
    for _ in $(seq 300); do [[ -S $db_socket && -s $db/mariadbd.pid ]] && break; sleep 0.1; done
    [[ -s $db/mariadbd.pid ]] || { tail -20 "$db/mariadbd.log" >&2; die "mariadbd did not start"; }
    echo "mariadbd $(cat "$db/mariadbd.pid")" >>"$state/pids"
    start_daemon slurmdbd "$state/slurmdbd.pid"
    for _ in $(seq 150); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.2; done
    sacctmgr -i add cluster deepnoise >/dev/null 2>&1 || true
    sacctmgr -n -P list cluster format=cluster | grep -qx deepnoise \
        || { tail -20 "$state/log/slurmdbd.log" >&2; die "slurmdbd does not answer or has no cluster 'deepnoise'"; }
fi

start_daemon slurmctld "$state/slurmctld.pid" -i
start_daemon slurmd "$state/slurmd.pid"

for _ in $(seq 150); do
    st=$(sinfo -h -n "$host" -o %T 2>/dev/null || true)
    [[ $st == idle ]] && break
    sleep 0.2
done
[[ $st == idle ]] || { tail -20 "$state/log/slurmctld.log" "$state/log/slurmd.log" >&2; die "node is '$st', not idle"; }
if [[ $accounting == 1 ]]; then
    # slurmctld registers with slurmdbd at start; sacct answers once it has
    for _ in $(seq 100); do sacct -n -X -o JobID >/dev/null 2>&1 && break; sleep 0.2; done
    sacct -n -X -o JobID >/dev/null || die "sacct does not work"
fi
echo "start-cluster: node $host idle (accounting: $accounting); state in $state" >&2
