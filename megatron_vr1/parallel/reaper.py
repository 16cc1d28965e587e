"""Nothing a command started outlives it, however it dies.

A trainer starts processes it does not fully control: the reward worker pool, the result-queue manager of
megatron's checkpoint writer, the SGLang server (in its own session, with its scheduler and detokenizer), their
resource trackers. A clean exit or SIGTERM stops them (``finally`` blocks, atexit hooks), but SIGKILL (the OOM
killer, ``scancel`` after its grace period, a torchrun teardown) runs no Python code, and each of them then lives
on under PID 1, holding memory, a port or a CUDA context that blocks the requeued job.

``reap_on_exit()`` marks this process's environment with ``MEGATRON_VR1_OWNER=<pid>.<start>``: every process
started from here on inherits the mark, whatever starts it and in whatever session. It also starts a watcher, a
few-MB standard-library process that checks once every ``POLL_S`` whether its parent still lives (``getppid()``
changes when the parent dies) and then SIGKILLs every process that carries the mark. A child that starts its own
``reap_on_exit`` (a nested command) replaces the mark for its own subtree, which its own watcher reaps.

This file is also the watcher's program: it is run by path with ``python -I`` (no site packages, nothing of the
package imported), so keep its top-level imports to the standard library. Linux only (``/proc``); elsewhere
``reap_on_exit`` does nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

OWNER_VAR = "MEGATRON_VR1_OWNER"
POLL_S = 0.5
SWEEPS = 4
"""Dying processes may still be forking: sweep a few times, ``POLL_S`` apart."""

_watcher: subprocess.Popen | None = None


def _start_ticks(pid: int) -> str:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat): with the pid, unique."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[19]


def reap_on_exit() -> str | None:
    """Mark this process's future children and start their watcher (once per process). Returns the mark, or
    None where there is no /proc."""
    global _watcher
    if _watcher is not None and _watcher.poll() is None:
        return os.environ[OWNER_VAR]
    if not Path("/proc/self/environ").exists():
        return None
    mark = f"{os.getpid()}.{_start_ticks(os.getpid())}"
    os.environ[OWNER_VAR] = mark
    env = {k: v for k, v in os.environ.items() if k != OWNER_VAR}  # the watcher must not reap itself
    _watcher = subprocess.Popen([sys.executable, "-I", str(Path(__file__).resolve()), str(os.getpid()), mark],
                                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
    return mark


def marked_processes(mark: str) -> list[int]:
    """Pids of the processes whose environment carries ``OWNER_VAR=mark``."""
    return processes_with(OWNER_VAR, mark)


def processes_with(var: str, value: str) -> list[int]:
    """Pids of the other processes whose environment carries ``var=value`` (other users' are unreadable: skipped)."""
    needle = f"\0{var}={value}\0".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours
            continue
        if needle in b"\0" + environ + b"\0":
            found.append(int(entry.name))
    return found


def _watch(parent: int, mark: str) -> None:
    while os.getppid() == parent:
        time.sleep(POLL_S)
    for _ in range(SWEEPS):
        for pid in marked_processes(mark):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(POLL_S)


if __name__ == "__main__":
    _watch(int(sys.argv[1]), sys.argv[2])
