#!/usr/bin/env bash
# Stop the test cluster started by start-cluster.sh STATE_DIR: cancel all jobs (job processes outlive
# slurmd), then stop exactly the daemons whose PIDs start-cluster.sh recorded, then remove the generated
# /etc/slurm config. Never kills by name.
#
#   tests/slurm/stop-cluster.sh STATE_DIR
set -uo pipefail

[[ $# -eq 1 ]] || { echo "usage: $0 STATE_DIR" >&2; exit 2; }
state=$1
pids=$state/pids
[[ -f $pids ]] || { echo "stop-cluster: no $pids; nothing to stop" >&2; exit 0; }

if grep -q '^slurmctld ' "$pids"; then
    jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
    if [[ -n ${jobs// /} ]]; then
        echo "stop-cluster: cancelling jobs $jobs" >&2
        scancel $jobs 2>/dev/null
        for _ in $(seq 100); do
            [[ -z $(squeue -h -t RUNNING,COMPLETING,PENDING -o %i 2>/dev/null) ]] && break
            sleep 0.2
        done
    fi
fi

# Reverse start order: slurmd, slurmctld, slurmdbd, mariadbd, munged.
status=0
while read -r name pid; do
    [[ $pid =~ ^[0-9]+$ ]] || continue
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "stop-cluster: $name ($pid) already gone" >&2
        continue
    fi
    kill -TERM "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        echo "stop-cluster: $name ($pid) ignored SIGTERM; sending SIGKILL" >&2
        kill -KILL "$pid"
        status=1
    fi
done < <(tac "$pids")
mv "$pids" "$pids.stopped"

if [[ -f $state/mariadb-dir ]]; then
    db=$(cat "$state/mariadb-dir")
    [[ $db == /tmp/deepnoise-test-mariadb.* && -d $db ]] && rm -rf "$db"
    rm -f "$state/mariadb-dir"
fi

for f in /etc/slurm/slurm.conf /etc/slurm/gres.conf /etc/slurm/slurmdbd.conf; do
    grep -qs deepnoise-test-cluster "$f" && rm -f "$f"
done
exit $status
