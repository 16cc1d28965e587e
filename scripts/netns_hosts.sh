#!/usr/bin/env bash
# netns_hosts.sh (the project's copy of shared/recipes/slurm-netns-cluster.sh, plus `on HOST CMD`)
# N simulated hosts on one machine (network + UTS namespaces), optionally running Slurm.
#
#   slurm-netns-cluster.sh net-up          namespaces n1..nN on a bridge (in its own namespace 'nbr'),
#                                          10.200.0.i/24 on 'sim0' in ni, hostname ni, /etc/netns/ni/hosts
#   slurm-netns-cluster.sh torchrun-demo   one plain torchrun per namespace (no Slurm), gloo all_reduce
#   slurm-netns-cluster.sh slurm-up        munged (shared unix socket), slurmctld on n1, one slurmd per namespace
#   netns_hosts.sh on HOST CMD...       run CMD "on" host HOST (its namespace, hostname and /etc/hosts)
#   slurm-netns-cluster.sh run CMD...      run CMD on n1 (hostname n1) with SLURM_CONF set, e.g. run sbatch --wait x.sh
#   slurm-netns-cluster.sh selftest        sbatch --wait: srun across hosts + srun torchrun (gloo) across hosts
#   slurm-netns-cluster.sh down            stop our daemons (recorded PIDs), delete the namespaces and /etc/netns/ni
#
# The 10.200.0.0/24 addresses exist only inside namespaces this script creates; nothing is added to the
# root namespace (the bridge lives in 'nbr'), so no traffic leaves them.
# Each host also has its own /dev/shm and /tmp (bind mounts of $NETNS_DIR/hosts/ni/{shm,tmp} in its mount
# namespace), as real hosts do: a same-host transport (shared memory, files in /tmp) fails between them as it
# would between machines. What the hosts share is the rest of the filesystem, like a cluster's shared one:
# keep what several hosts read (models, run dirs, NETNS_DIR itself) outside /tmp.
# Knobs: NETNS_HOSTS=2, NETNS_DIR=/var/tmp/slurm-netns (not under /tmp), NETNS_SUBNET=10.200.0,
#        NETNS_CPUS=$(nproc) per host.
# Needs: root, iproute2, util-linux (nsenter/unshare); Slurm+munge from Debian (installed if missing).
set -euo pipefail

N=${NETNS_HOSTS:-2}
DIR=${NETNS_DIR:-/var/tmp/slurm-netns}
case "$(realpath -m "$DIR")/" in /tmp/*) echo "NETNS_DIR=$DIR is under /tmp, which each simulated host has its own of; use another directory" >&2; exit 2 ;; esac
NET=${NETNS_SUBNET:-10.200.0}
CPUS=${NETNS_CPUS:-$(nproc)}
export SLURM_CONF=$DIR/slurm.conf
PIDS=$DIR/started.pids
HOSTS=$(seq -f 'n%g' 1 "$N")

log() { printf '[slurm-netns %(%T)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; for f in "$DIR"/log/*.log; do [ -f "$f" ] && { echo "== $f" >&2; tail -n 15 "$f" >&2; }; done; exit 1; }
alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null && [ "$(ps -o comm= -p "$1" 2>/dev/null)" = "$2" ]; }

# Run a command "on host ni": its network namespace, its own hostname, /etc/hosts, /dev/shm and /tmp.
# (Not 'ip netns exec': that remounts /sys without /sys/fs/cgroup, and slurmd 22.05 refuses to start
#  without a cgroup mount even with proctrack/linuxproc + task/none.)
on_host() {
  local h=$1; shift
  mkdir -p "$DIR/hosts/$h/tmp" "$DIR/hosts/$h/shm"
  chmod 1777 "$DIR/hosts/$h/tmp" "$DIR/hosts/$h/shm"
  nsenter --net="/run/netns/$h" unshare --uts --mount --propagation private -- \
    sh -c 'hostname "$0" && mount --bind "/etc/netns/$0/hosts" /etc/hosts &&
           mount --bind "$1/shm" /dev/shm && mount --bind "$1/tmp" /tmp && shift && exec "$@"' \
    "$h" "$DIR/hosts/$h" "$@"
}

cmd_net_up() {
  ip netns list | grep -qw nbr && { log "namespaces already up"; return 0; }
  ip netns add nbr
  ip -n nbr link add br0 type bridge
  ip -n nbr link set br0 up
  local i=0 h
  for h in $HOSTS; do
    i=$((i + 1))
    ip netns add "$h"
    ip link add sim0 netns "$h" type veth peer name "$h" netns nbr
    ip -n nbr link set "$h" master br0
    ip -n nbr link set "$h" up
    ip -n "$h" addr add "$NET.$i/24" dev sim0
    ip -n "$h" link set sim0 up
    ip -n "$h" link set lo up
    mkdir -p "/etc/netns/$h"
    { echo "127.0.0.1 localhost"; local j=0 g; for g in $HOSTS; do j=$((j + 1)); echo "$NET.$j $g"; done; } \
      > "/etc/netns/$h/hosts"
  done
  log "hosts up: $(for h in $HOSTS; do printf '%s=%s ' "$h" "$(ip -n "$h" -4 -br addr show sim0 | awk '{print $3}')"; done)"
}

install_pkgs() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && return 0
  local added=0
  [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; added=1; }
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
  [ "$added" = 1 ] && rm -f /usr/sbin/policy-rc.d
  return 0
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

cmd_slurm_up() {
  cmd_net_up
  install_pkgs
  if [ -s "$PIDS" ]; then
    local ok=1 pid comm
    while read -r pid comm; do alive "$pid" "$comm" || ok=0; done < "$PIDS"
    [ "$ok" = 1 ] && { log "slurm already running"; return 0; }
    die "some recorded daemons died; run '$0 down' first"
  fi
  mkdir -p "$DIR"/{state,log,run}
  : > "$PIDS"
  local i=0 h
  {
    cat <<EOF
ClusterName=netnsci
SlurmctldHost=n1($NET.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=4
KillWait=5
MailProg=/bin/true
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
EOF
    for h in $HOSTS; do i=$((i + 1)); echo "NodeName=$h NodeAddr=$NET.$i CPUs=$CPUS RealMemory=4000 State=UNKNOWN"; done
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
  } > "$SLURM_CONF"
  # munge's socket is a path (/run/munge/munge.socket.2), so every namespace shares the one munged
  if ! munge_ok; then
    [ -s /etc/munge/munge.key ] || { dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none;
                                     chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key; }
    install -d -o munge -g munge -m 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged
    for i in $(seq 50); do munge_ok && break; sleep 0.1; done
    munge_ok || die "munged did not start"
    echo "$(cat /run/munge/munged.pid) munged" >> "$PIDS"
  fi
  on_host n1 slurmctld -c
  for i in $(seq 100); do [ -s "$DIR/run/slurmctld.pid" ] && break; sleep 0.1; done
  echo "$(cat "$DIR/run/slurmctld.pid") slurmctld" >> "$PIDS"
  for h in $HOSTS; do
    mkdir -p "$DIR/spool/$h"
    on_host "$h" slurmd -N "$h"
    for i in $(seq 100); do [ -s "$DIR/run/slurmd-$h.pid" ] && break; sleep 0.1; done
    [ -s "$DIR/run/slurmd-$h.pid" ] || die "slurmd on $h did not start"
    echo "$(cat "$DIR/run/slurmd-$h.pid") slurmd" >> "$PIDS"
  done
  local deadline=$((SECONDS + 60)) st
  while :; do
    st=$(on_host n1 sinfo -h -N -o '%N %T' 2>/dev/null | sort -u || true)
    [ -n "$st" ] && ! grep -qv ' idle$' <<<"$st" && break
    [ $SECONDS -ge $deadline ] && die "nodes not idle: $st"
    sleep 0.5
  done
  log "slurm up: $(tr '\n' ' ' <<<"$st")"
}

cmd_run() { on_host n1 env SLURM_CONF="$SLURM_CONF" "$@"; }

cmd_torchrun_demo() {
  cmd_net_up
  local py; py=$(command -v python3); "$py" -c 'import torch' || die "torch not importable by $py"
  mkdir -p "$DIR"; write_allreduce
  local h pids=() rc=0
  for h in $HOSTS; do
    on_host "$h" timeout 120 "$(dirname "$py")/torchrun" --nnodes="$N" --nproc_per_node=1 \
      --rdzv_id=demo --rdzv_backend=c10d --rdzv_endpoint=n1:29400 "$DIR/allreduce.py" > "$DIR/demo-$h.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  grep -h '^rank=' "$DIR"/demo-n*.log || true
  [ "$rc" = 0 ] && log "torchrun-demo OK" || die "torchrun-demo failed; see $DIR/demo-*.log"
}

write_allreduce() {
  cat > "$DIR/allreduce.py" <<'EOF'
import datetime, os, socket
import torch, torch.distributed as dist
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
r, w = dist.get_rank(), dist.get_world_size()
t = torch.tensor([float(r + 1)]); dist.all_reduce(t)
print(f"rank={r}/{w} host={socket.gethostname()} addr={socket.gethostbyname(socket.gethostname())} allreduce={t.item()}", flush=True)
assert t.item() == w * (w + 1) / 2
dist.destroy_process_group()
EOF
}

cmd_selftest() {
  local py; py=$(command -v python3)
  mkdir -p "$DIR/jobs"; rm -f "$DIR"/jobs/*.out; write_allreduce
  cat > "$DIR/jobs/ranks.sbatch" <<EOF
#!/bin/bash
#SBATCH --nodes=$N --ntasks-per-node=1 --time=00:02:00 --output=$DIR/jobs/%x-%j.out
srun $py -c 'import os, socket; print("SLURM_PROCID", os.environ["SLURM_PROCID"], socket.gethostname(), socket.gethostbyname(socket.gethostname()), flush=True)'
EOF
  cmd_run sbatch --wait "$DIR/jobs/ranks.sbatch" >/dev/null || die "ranks job failed"
  cat "$DIR"/jobs/ranks*.out
  if "$py" -c 'import torch' 2>/dev/null; then
    cat > "$DIR/jobs/torchrun.sbatch" <<EOF
#!/bin/bash
#SBATCH --nodes=$N --ntasks-per-node=1 --cpus-per-task=$CPUS --time=00:05:00 --output=$DIR/jobs/%x-%j.out
set -euo pipefail
export MASTER_ADDR=\$(scontrol show hostnames "\$SLURM_JOB_NODELIST" | head -n1)
export MASTER_PORT=\$((29500 + SLURM_JOB_ID % 1000))
srun $(dirname "$py")/torchrun --nnodes=\$SLURM_NNODES --nproc_per_node=1 --rdzv_id=\$SLURM_JOB_ID \\
  --rdzv_backend=c10d --rdzv_endpoint=\$MASTER_ADDR:\$MASTER_PORT $DIR/allreduce.py
EOF
    cmd_run sbatch --wait "$DIR/jobs/torchrun.sbatch" >/dev/null || { cat "$DIR"/jobs/torchrun*.out; die "torchrun job failed"; }
    grep -o 'rank=.*allreduce=[0-9.]*' "$DIR"/jobs/torchrun*.out
  fi
  log "selftest OK"
}

cmd_down() {
  if [ -s "$PIDS" ]; then
    if alive "$(awk '$2=="slurmctld"{print $1}' "$PIDS")" slurmctld; then
      cmd_run scancel --quiet --user=root 2>/dev/null || true; sleep 1
    fi
    local pid comm i
    tac "$PIDS" | while read -r pid comm; do
      alive "$pid" "$comm" || continue
      kill -TERM "$pid"
      for i in $(seq 50); do alive "$pid" "$comm" || break; sleep 0.1; done
      alive "$pid" "$comm" && kill -KILL "$pid"
      log "stopped $comm ($pid)"
    done
    : > "$PIDS"
  fi
  local h
  # deleting a namespace destroys its veth end, and with it the peer in 'nbr'
  for h in $HOSTS nbr; do ip netns list | grep -qw "$h" && ip netns del "$h" && log "deleted netns $h"; done
  for h in $HOSTS; do rm -rf "/etc/netns/$h" "$DIR/hosts/$h"; done
  rmdir /etc/netns 2>/dev/null || true
}

case "${1:-}" in
  net-up) cmd_net_up ;;
  torchrun-demo) cmd_torchrun_demo ;;
  slurm-up) cmd_slurm_up ;;
  run) shift; cmd_run "$@" ;;
  on) shift; h=$1; shift; on_host "$h" "$@" ;;
  selftest) cmd_selftest ;;
  down) cmd_down ;;
  *) echo "usage: $0 net-up|torchrun-demo|slurm-up|run CMD...|on HOST CMD...|selftest|down" >&2; exit 2 ;;
esac
