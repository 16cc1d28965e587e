"""Two simulated hosts (network + UTS namespaces, their own addresses and hostnames): a TP=2 megatron-core
training step with one rank per host, over gloo across the bridge, equals the single-process TP=1 step."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NETNS = REPO / "scripts" / "netns_hosts.sh"

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                 reason="network namespaces need root and iproute2")]


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory):
    env = dict(os.environ, NETNS_HOSTS="2", NETNS_DIR=str(tmp_path_factory.mktemp("netns")))
    subprocess.run(["bash", str(NETNS), "down"], env=env, capture_output=True)  # leftovers of a killed run
    subprocess.run(["bash", str(NETNS), "net-up"], env=env, check=True, capture_output=True, timeout=60)
    yield env
    subprocess.run(["bash", str(NETNS), "down"], env=env, capture_output=True, timeout=120)


def _smoke_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "megatron_vr1.training.smoke", "--steps", "2", *args]


def test_tp2_step_with_one_rank_per_host(two_hosts, tmp_path):
    out = tmp_path / "rank{rank}.json"
    procs = []
    for host in ("n1", "n2"):
        cmd = ["bash", str(NETNS), "on", host, "env", "GLOO_SOCKET_IFNAME=sim0", "OMP_NUM_THREADS=1",
               "CUDA_VISIBLE_DEVICES=", sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
               "--nproc_per_node=1", "--rdzv_id=vr1", "--rdzv_backend=c10d", "--rdzv_endpoint=n1:29400",
               "-m", "megatron_vr1.training.smoke", "--tp", "2", "--steps", "2", "--out", str(out)]
        procs.append(subprocess.Popen(cmd, env=two_hosts, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(r["host"] for r in ranks) == ["n1", "n2"]  # really one rank per simulated host

    ref_file = tmp_path / "tp1.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    subprocess.run(_smoke_cmd("--tp", "1", "--out", str(ref_file)), env=env, check=True, capture_output=True,
                   timeout=600)
    ref = json.loads(ref_file.read_text())
    for r in ranks:
        for a, b in zip(r["losses"] + r["grad_norms"], ref["losses"] + ref["grad_norms"]):
            assert abs(a - b) <= 1e-6 * abs(b), (r, ref)
