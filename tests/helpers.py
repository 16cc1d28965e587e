"""Shared test helpers: running torchrun workers as real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from megatron_vr1.parallel.env import free_port

REPO = Path(__file__).resolve().parent.parent


def torchrun(script: str | Path, nproc: int, args: list[str], out_dir: Path, timeout: float = 300.0,
             gpus: bool = False) -> list[dict]:
    """Run ``script`` under torchrun with ``nproc`` gloo ranks (``gpus``: NCCL ranks, one GPU each); each rank
    writes ``out_dir/rank{r}.json``. Returns the per-rank results (rank order). Fails the test with the workers'
    output on error."""
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    if not gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(script), "--out", str(out_dir), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}): {' '.join(cmd)}\n--- stdout\n{proc.stdout[-6000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(nproc)]


TAG_VAR = "MEGATRON_VR1_TEST_JOB"
"""Set in the environment of a job a test starts: every process the job starts inherits it."""


def tagged_processes(tag: str) -> list[tuple[int, str]]:
    """(pid, command line) of every live process whose environment carries ``TAG_VAR=tag``."""
    from megatron_vr1.parallel.reaper import processes_with

    found = []
    for pid in processes_with(TAG_VAR, tag):
        try:
            found.append((pid, Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:160]))
        except OSError:  # exited meanwhile
            continue
    return found


def wait_until_gone(tag: str, timeout: float = 20.0) -> list[tuple[int, str]]:
    """Wait for every process of the job ``tag`` to exit; returns those still running at the deadline."""
    import time

    deadline = time.monotonic() + timeout
    while (left := tagged_processes(tag)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


NETNS = REPO / "scripts" / "netns_hosts.sh"


def simulated_hosts():
    """Two simulated hosts n1, n2 (scripts/netns_hosts.sh: network, UTS and mount namespaces, each with its own
    /dev/shm and /tmp). Yields (environment for the script, a directory both hosts see: their "shared
    filesystem", outside /tmp). A generator for a module-scoped fixture."""
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="vr1-netns-", dir="/var/tmp"))
    env = dict(os.environ, NETNS_HOSTS="2", NETNS_DIR=str(root / "netns"))
    subprocess.run(["bash", str(NETNS), "down"], env=env, capture_output=True)  # leftovers of a killed run
    subprocess.run(["bash", str(NETNS), "net-up"], env=env, check=True, capture_output=True, timeout=60)
    (root / "shared").mkdir()
    try:
        yield env, root / "shared"
    finally:
        subprocess.run(["bash", str(NETNS), "down"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)
