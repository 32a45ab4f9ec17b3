#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine (Debian's slurmctld + slurmd + munge, as the
# multi-process tests use it): `start DIR` writes DIR/slurm.conf, starts munged, slurmctld and
# slurmd on free loopback ports and waits until the node is idle; then `SLURM_CONF=DIR/slurm.conf
# srun …` / `sbatch …` work. `stop DIR` ends them. Runs as root (munged --force); the node is
# called `localhost` (so SLURM_JOB_NODELIST resolves anywhere) with this machine's CPUs.
# scripts/setup.sh installs the packages: apt-get install slurmctld slurmd slurm-client munge.
set -euo pipefail
cmd=${1:?usage: slurm-local.sh start|stop DIR}
dir=${2:?usage: slurm-local.sh start|stop DIR}
case $cmd in
stop)
  SLURM_CONF=$dir/slurm.conf scontrol shutdown >/dev/null 2>&1 || true
  for p in slurmd.pid slurmctld.pid munged.pid; do
    [[ -f $dir/$p ]] && kill "$(cat "$dir/$p")" 2>/dev/null || true
  done
  exit 0
  ;;
start) ;;
*) echo "usage: slurm-local.sh start|stop DIR" >&2; exit 2 ;;
esac
for b in munged slurmctld slurmd srun sbatch; do
  command -v "$b" >/dev/null || {
    echo "$b is missing: run scripts/setup.sh (apt-get install slurmctld slurmd slurm-client munge)" >&2
    exit 1
  }
done
mkdir -p "$dir/state" "$dir/spool"
dir=$(cd "$dir" && pwd)
[[ -f $dir/munge.key ]] || { head -c 1024 /dev/urandom >"$dir/munge.key"; chmod 400 "$dir/munge.key"; }
munged --force --socket="$dir/munge.sock" --key-file="$dir/munge.key" --pid-file="$dir/munged.pid" \
  --log-file="$dir/munged.log" --seed-file="$dir/munge.seed"
read -r p1 p2 < <(python3 -c 'import socket
s=[socket.socket() for _ in range(2)]
[x.bind(("127.0.0.1",0)) for x in s]
print(*[x.getsockname()[1] for x in s])')
cat >"$dir/slurm.conf" <<CONF
ClusterName=llava
SlurmctldHost=localhost(127.0.0.1)
AuthType=auth/munge
AuthInfo=socket=$dir/munge.sock
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$p1
SlurmdPort=$p2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName=localhost NodeHostname=$(hostname) NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
export SLURM_CONF=$dir/slurm.conf
slurmctld -c
slurmd -N localhost
for _ in $(seq 100); do
  [[ $(sinfo -h -o %t 2>/dev/null) == idle ]] && { echo "$dir/slurm.conf"; exit 0; }
  sleep 0.2
done
echo "slurm did not come up; logs in $dir" >&2
tail -n 20 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 || true
exit 1
