"""A process that launched a real SGLang server and is then stopped with SIGTERM (``kill``, Slurm's scancel or
time limit) takes the server with it: the CLI turns SIGTERM into SystemExit, so the atexit hook stops the
server's process group. Before this, a trainer killed with SIGTERM left its server running, busy-polling a core.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tiny_vl
from megatron_vr1.rollout.sglang_server import SGLangNotInstalled, find_sglang_python

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]

CHILD = """
import sys, time
from megatron_vr1.cli import _exit_cleanly_on_sigterm
from megatron_vr1.rollout.sglang_server import SGLangServer, ServerSpec
_exit_cleanly_on_sigterm()
server = SGLangServer(ServerSpec(model_path=sys.argv[1], log_dir=sys.argv[2])).start()
print("server-pgid", server.proc.pid, flush=True)
time.sleep(600)
"""


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigterm_stops_the_rollout_server_it_launched(tmp_path):
    try:
        find_sglang_python()
    except SGLangNotInstalled as e:
        pytest.skip(str(e))
    model_dir = tiny_vl.build(tmp_path / "tiny")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(model_dir), str(tmp_path / "logs")], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pgid = None
    try:
        for line in proc.stdout:  # blocks until the server answers /health_generate (or the child dies)
            if line.startswith("server-pgid"):
                pgid = int(line.split()[1])
                break
        assert pgid is not None, f"the child exited with {proc.wait()} before its server was up"
        assert _group_alive(pgid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 30
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _group_alive(pgid), "the SGLang server outlived the process that launched it"
    finally:
        if proc.poll() is None:
            proc.kill()
        if pgid is not None and _group_alive(pgid):
            os.killpg(pgid, signal.SIGKILL)
