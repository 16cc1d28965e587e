"""Launching and stopping an SGLang server process (``python -m sglang.launch_server``; on CPU the same launcher
through ``sglang_cpu_server.py``, which batches the CPU engine's decode attention).

This is the one place that knows where SGLang is installed:
- ``$MEGATRON_VR1_SGLANG_PYTHON`` if set;
- else ``<repo>/.venv-sglang/bin/python`` (CPU hosts; built by scripts/bootstrap_sglang.sh);
- else the current interpreter, when it can import sglang (a normal GPU install).

A server binds 127.0.0.1 unless told otherwise, writes its log to a file, is started in its own process group
(SGLang forks a scheduler and a detokenizer) and is killed as a group on ``stop()``, on interpreter exit, and
on restart.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from megatron_vr1.config.base import require
from megatron_vr1.parallel.env import free_port
from megatron_vr1.rollout.sglang_http import Endpoint, is_healthy

REPO = Path(__file__).resolve().parents[2]
CPU_VENV_PYTHON = REPO / ".venv-sglang" / "bin" / "python"
CPU_LAUNCHER = Path(__file__).with_name("sglang_cpu_server.py")
"""SGLang's launch_server with decode attention batched over requests (the CPU engine's per-request loop was 70%
of its decode time); see that file."""

# The CPU engine of SGLang 0.5.10 (cpu-stack §2b): native torch attention, no CUDA graphs, no grammar backend,
# a small static KV pool. float32 keeps its logprobs comparable with the trainer's at 1e-4.
CPU_FLAGS = ("--device", "cpu", "--attention-backend", "torch_native", "--disable-cuda-graph",
             "--grammar-backend", "none", "--sleep-on-idle")
CPU_MAX_TOTAL_TOKENS = 8192
CPU_MAX_RUNNING_REQUESTS = 128
"""On CPU each scheduler iteration has a large fixed cost, so the whole rollout batch should run at once: 32
completions of the demo's model take 1.5 s with 32 running requests and 16-35 s with 8; the demo's 128 (16
prompts x 8) take 2.1 s with 128 and 2.2 s with 64 (two waves), measured on 2 cores."""


class SGLangNotInstalled(RuntimeError):
    """No interpreter with SGLang was found; the message says how to get one."""


def find_sglang_python() -> str:
    """The interpreter that runs the server (see the module docstring for the search order)."""
    override = os.environ.get("MEGATRON_VR1_SGLANG_PYTHON")
    if override:
        if not Path(override).exists():
            raise SGLangNotInstalled(f"MEGATRON_VR1_SGLANG_PYTHON={override} does not exist; fix or unset it")
        return override
    if CPU_VENV_PYTHON.exists():
        return str(CPU_VENV_PYTHON)
    if importlib.util.find_spec("sglang") is not None:
        return sys.executable
    raise SGLangNotInstalled(
        "SGLang is not installed. On a CPU host run `bash scripts/bootstrap_sglang.sh` (or `make`) to build "
        ".venv-sglang; on a GPU host `pip install sglang==0.5.10.post1`; or set MEGATRON_VR1_SGLANG_PYTHON.")


@dataclass(kw_only=True, slots=True)
class ServerSpec:
    """How to launch one SGLang server."""

    model_path: str
    """A Hugging Face checkpoint directory (config, safetensors, tokenizer, processor)."""
    host: str = "127.0.0.1"
    """Loopback by default: the server has admin endpoints (weight updates) behind only an API key."""
    port: int = 0
    """0 picks a free port."""
    api_key: str = ""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """"auto": cuda when torch sees a GPU, else cpu."""
    dtype: str = "auto"
    """"auto": float32 on CPU, the checkpoint's dtype on GPU."""
    max_total_tokens: int = 0
    """The KV cache's size in tokens; 0 = SGLang sizes it from ``mem_fraction_static`` on GPU, CPU_MAX_TOTAL_TOKENS
    on CPU (its static pool there is small)."""
    max_running_requests: int = 0
    """Concurrent requests in the server's batch; 0 = SGLang's default on GPU, CPU_MAX_RUNNING_REQUESTS on CPU."""
    mem_fraction_static: float = 0.0
    """Share of memory for weights + KV cache; 0 = SGLang's default on GPU, 0.05 on CPU (host RAM is shared)."""
    log_dir: str = "runs/sglang"
    startup_timeout_s: float = 600.0
    skip_warmup: bool = True
    """/health_generate already proves a generation works; SGLang's own warmup only costs startup time."""
    cache_vision_embeddings: bool = False
    """SGLang keeps ViT outputs per image hash (100 MB) and /flush_cache does not clear them, so after a weight
    sync a seen image would be encoded by the old vision tower. Off unless the vision tower is frozen."""
    shm_mm_features: bool = False
    """SGLang's default for one node: image features go from its tokenizer process to its scheduler through a
    shared-memory segment per request. Off (we give ``--dist-init-addr 127.0.0.1:PORT``, which selects SGLang's
    pickled transport) because that segment is unlinked after the first reader, so parallel sampling (n > 1) of a
    prompt with an image crashes the scheduler (FileNotFoundError: /psm_...), and because it cost the CPU demo's
    rollouts 30% (3.9 s -> 2.7 s per 128 completions without it, measured)."""
    batched_cpu_decode: bool = True
    """On CPU, launch through ``sglang_cpu_server.py`` (decode attention batched over requests: 2x faster rollouts
    of the CPU demo) rather than SGLang's own ``sglang.launch_server`` (False: stock SGLang, e.g. to compare)."""
    extra_args: tuple[str, ...] = ()
    python: str = ""
    """The interpreter with SGLang; empty means ``find_sglang_python()``."""

    def __post_init__(self) -> None:
        require(Path(self.model_path, "config.json").is_file(), "server.model_path", self.model_path,
                "point to a Hugging Face checkpoint directory containing config.json")
        require(0 <= self.port < 65536, "server.port", self.port, "use 0 (free port) or a port number")
        require(self.startup_timeout_s > 0, "server.startup_timeout_s", self.startup_timeout_s, "use seconds > 0")
        require(0.0 <= self.mem_fraction_static < 1.0, "server.mem_fraction_static", self.mem_fraction_static,
                "use a fraction in [0, 1); 0 picks the default")
        require(self.max_total_tokens == 0 or self.max_total_tokens >= 256, "server.max_total_tokens",
                self.max_total_tokens, "use 0 (the device's default) or >= 256")
        require(self.max_running_requests >= 0, "server.max_running_requests", self.max_running_requests,
                "use 0 (the device's default) or a positive count")

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        try:
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:
            return "cpu"


_LIVE: set["SGLangServer"] = set()


@atexit.register
def _kill_all_live() -> None:
    """No orphan servers: whatever a crashed test or trainer left running dies with the interpreter."""
    for server in list(_LIVE):
        server.stop()


class SGLangServer:
    """One SGLang server process: ``start()`` waits until it can generate; ``restart()`` replaces it."""

    def __init__(self, spec: ServerSpec):
        self.spec = spec
        self.port = spec.port or free_port()
        self.dist_port = free_port()
        """The server's torch.distributed rendezvous (``--dist-init-addr``; loopback, one node)."""
        self.proc: subprocess.Popen | None = None
        self.log_path = Path(spec.log_dir) / f"sglang-{self.port}.log"
        self.restarts = 0

    @property
    def endpoint(self) -> Endpoint:
        host = "127.0.0.1" if self.spec.host in ("0.0.0.0", "::") else self.spec.host
        return Endpoint(f"http://{host}:{self.port}", self.spec.api_key)

    @property
    def device(self) -> str:
        return self.spec.resolved_device()

    def command(self) -> list[str]:
        s = self.spec
        device = self.device
        # On CPU: SGLang's launcher plus attention batched over requests (sglang_cpu_server.py, run by path).
        batched = device == "cpu" and s.batched_cpu_decode
        launcher = [str(CPU_LAUNCHER)] if batched else ["-m", "sglang.launch_server"]
        cmd = [s.python or find_sglang_python(), *launcher, "--model-path", s.model_path,
               "--host", s.host, "--port", str(self.port)]
        total = s.max_total_tokens or (CPU_MAX_TOTAL_TOKENS if device == "cpu" else 0)
        if total:
            cmd += ["--max-total-tokens", str(total)]
        running = s.max_running_requests or (CPU_MAX_RUNNING_REQUESTS if device == "cpu" else 0)
        if running:
            cmd += ["--max-running-requests", str(running)]
        if device == "cpu":
            cmd += [*CPU_FLAGS, "--dtype", "float32" if s.dtype == "auto" else s.dtype,
                    "--mem-fraction-static", str(s.mem_fraction_static or 0.05)]
        else:
            if s.mem_fraction_static:
                cmd += ["--mem-fraction-static", str(s.mem_fraction_static)]
            if s.dtype != "auto":
                cmd += ["--dtype", s.dtype]
        if s.api_key:
            cmd += ["--api-key", s.api_key]
        if s.skip_warmup:
            cmd.append("--skip-server-warmup")
        if not s.shm_mm_features and "--dist-init-addr" not in s.extra_args:
            cmd += ["--dist-init-addr", f"127.0.0.1:{self.dist_port}"]
        return cmd + list(s.extra_args)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        # The trainer's PYTHONPATH would put its transformers (5.23) ahead of the server's pinned 5.3.0.
        env.pop("PYTHONPATH", None)
        if not self.spec.cache_vision_embeddings:
            env["SGLANG_VLM_CACHE_SIZE_MB"] = "0"
        if self.device == "cpu":
            env["SGLANG_USE_CPU_ENGINE"] = "1"
            env.setdefault("CUDA_VISIBLE_DEVICES", "")
        return env

    def start(self) -> "SGLangServer":
        """Launch and block until /health_generate answers; raise with the log tail if it does not."""
        if self.alive():
            return self
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        log.write(f"\n=== launch {time.strftime('%H:%M:%S')}: {' '.join(self.command())}\n".encode())
        log.flush()
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.environment(),
                                     start_new_session=True, stdin=subprocess.DEVNULL)
        log.close()
        _LIVE.add(self)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.spec.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                self.stop()
                raise RuntimeError(f"SGLang server exited with code {code} during startup; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            if is_healthy(self.endpoint, timeout=30.0):
                return
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"SGLang server on port {self.port} not healthy after {self.spec.startup_timeout_s:.0f} s; "
                           f"log {self.log_path}:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the server's whole process group (used by stop, and by tests to simulate a crash)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL it after ``grace_s``; idempotent."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.kill(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    pass
            # The scheduler children may outlive the launcher; the group kill reaches them.
            self.kill(signal.SIGKILL)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
            self.proc = None
        _LIVE.discard(self)

    def restart(self) -> "SGLangServer":
        """Kill whatever is left and launch again on the same port (same URL for clients)."""
        self.stop()
        self.restarts += 1
        return self.start()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> "SGLangServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
