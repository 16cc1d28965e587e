"""A dedicated rollout server on another host: the real SGLang CPU server started by `megatron-vr1 serve-rollout`
on simulated host n2 (its own network namespace, address and hostname), the trainer's side of the weight sync on
n1 (tests/integration/dedicated_sync_probe.py).

- The same-host transport (``tensor``: shared-memory handles) is refused before anything is sent, with a message
  naming the transport and the host; the server is untouched.
- The ``distributed`` transport crosses hosts: the trainer listens on its address that routes to n2 (found from
  the routing table, not 127.0.0.1), the server's TP ranks join the group, the new weights land, and the server's
  logprobs equal the in-process reference's with the same weights.

Each simulated host has its own /dev/shm and /tmp; the model, the logs and the report live in the directory both
see, as on a cluster's shared filesystem.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import NETNS, REPO, simulated_hosts
from sglang_testkit import build_assets

PROBE = Path(__file__).with_name("dedicated_sync_probe.py")

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                 reason="network namespaces need root and iproute2")]


two_hosts = pytest.fixture(scope="module")(simulated_hosts)


def _on(host: str, *cmd: str) -> list[str]:
    return ["bash", str(NETNS), "on", host, "env", "GLOO_SOCKET_IFNAME=sim0", "OMP_NUM_THREADS=1",
            "CUDA_VISIBLE_DEVICES=", f"PYTHONPATH={REPO}", *cmd]


def test_dedicated_server_on_another_host_is_synced_over_a_process_group(two_hosts):
    env_hosts, shared = two_hosts
    assets = build_assets(shared)
    key, port = secrets.token_hex(8), 30000 + os.getpid() % 20000
    server = subprocess.Popen(
        _on("n2", f"MEGATRON_VR1_SGLANG_API_KEY={key}", sys.executable, "-m", "megatron_vr1.cli", "serve-rollout",
            "--model", str(assets["model_dir"]), "--host", "0.0.0.0", "--port", str(port),
            "--log-dir", str(shared / "logs")),
        env=env_hosts, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        lines = []
        for line in server.stdout:  # blocks until the server answers /health_generate (or serve-rollout exits)
            lines.append(line)
            if line.startswith("ready:"):
                break
        assert server.poll() is None, "".join(lines[-40:])
        t0 = time.monotonic()
        probe = subprocess.run(
            _on("n1", sys.executable, str(PROBE), f"http://n2:{port}", str(assets["model_dir"]),
                str(shared / "report.json"), assets["image"], key),
            env=env_hosts, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert probe.returncode == 0, probe.stdout[-3000:] + probe.stderr[-6000:]
        report = json.loads((shared / "report.json").read_text())
        print(f"probe {time.monotonic() - t0:.1f} s: {report}")
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # serve-rollout stops its server on SIGTERM
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)

    refused = report["tensor_refused"]
    assert refused is not None and "rollout.sync_transport=tensor" in refused and "n2" in refused, refused
    assert report["healthy_after_refusal"] and report["version_after_refusal"] == 0  # nothing was sent
    assert report["group_address"] == "10.200.0.1"  # n1's address on the simulated network, not loopback
    assert report["version"] == report["server_version"] == 1
    assert report["completion_versions"] == [1]
    assert report["gap"] <= 1e-4
