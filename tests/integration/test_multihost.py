"""Two simulated hosts (network, UTS and mount namespaces: their own addresses, hostnames, /dev/shm and /tmp): a
TP=2 megatron-core training step with one rank per host, over gloo across the bridge, equals the single-process
TP=1 step; and the hosts share no /dev/shm or /tmp."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import NETNS, simulated_hosts

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                 reason="network namespaces need root and iproute2")]


two_hosts = pytest.fixture(scope="module")(simulated_hosts)


def _smoke_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "megatron_vr1.training.smoke", "--steps", "2", *args]


def test_tp2_step_with_one_rank_per_host(two_hosts, tmp_path):
    env_hosts, shared = two_hosts
    out = shared / "rank{rank}.json"  # written on the hosts: their /tmp is their own
    procs = []
    for host in ("n1", "n2"):
        cmd = ["bash", str(NETNS), "on", host, "env", "GLOO_SOCKET_IFNAME=sim0", "OMP_NUM_THREADS=1",
               "CUDA_VISIBLE_DEVICES=", sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
               "--nproc_per_node=1", "--rdzv_id=vr1", "--rdzv_backend=c10d", "--rdzv_endpoint=n1:29400",
               "-m", "megatron_vr1.training.smoke", "--tp", "2", "--steps", "2", "--out", str(out)]
        procs.append(subprocess.Popen(cmd, env=env_hosts, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    ranks = [json.loads((shared / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(r["host"] for r in ranks) == ["n1", "n2"]  # really one rank per simulated host

    ref_file = tmp_path / "tp1.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    subprocess.run(_smoke_cmd("--tp", "1", "--out", str(ref_file)), env=env, check=True, capture_output=True,
                   timeout=600)
    ref = json.loads(ref_file.read_text())
    for r in ranks:
        for a, b in zip(r["losses"] + r["grad_norms"], ref["losses"] + ref["grad_norms"]):
            assert abs(a - b) <= 1e-6 * abs(b), (r, ref)


def test_hosts_have_their_own_dev_shm_and_tmp(two_hosts):
    """What a real pair of hosts does not share, the simulated ones do not either: a same-host transport (shared
    memory, files in /tmp) fails between them instead of working by accident."""
    env_hosts, shared = two_hosts
    name = f"vr1-probe-{os.getpid()}"

    def on(host: str, script: str) -> str:
        return subprocess.run(["bash", str(NETNS), "on", host, "sh", "-c", script], env=env_hosts, check=True,
                              capture_output=True, text=True, timeout=60).stdout

    on("n1", f"echo n1 > /dev/shm/{name} && echo n1 > /tmp/{name} && echo n1 > {shared}/{name}")
    assert on("n1", f"cat /dev/shm/{name} /tmp/{name}").split() == ["n1", "n1"]  # every process of n1 sees them
    assert on("n2", f"ls /dev/shm/{name} /tmp/{name} 2>/dev/null; cat {shared}/{name}").split() == ["n1"]
    assert not Path(f"/dev/shm/{name}").exists() and not Path(f"/tmp/{name}").exists()  # nor the machine itself
