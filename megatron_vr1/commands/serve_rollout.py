"""``megatron-vr1 serve-rollout --model DIR``: launch an SGLang rollout server and keep it up until Ctrl-C.

On a CPU host it runs SGLang 0.5.10's CPU engine from .venv-sglang (scripts/bootstrap_sglang.sh); on a GPU host
a normal SGLang install. Binds 127.0.0.1 unless --host says otherwise; the log goes to a file.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Hugging Face checkpoint directory (config.json, safetensors)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="bind address (default loopback; the weight-update endpoints are admin endpoints)")
    parser.add_argument("--port", type=int, default=30000, help="port (0 picks a free one)")
    parser.add_argument("--api-key", default=os.environ.get("MEGATRON_VR1_SGLANG_API_KEY", ""),
                        help="require this key (default: $MEGATRON_VR1_SGLANG_API_KEY); strongly advised off loopback")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dtype", default="auto", help='"auto": float32 on CPU, the checkpoint dtype on GPU')
    parser.add_argument("--log-dir", default="runs/sglang", help="where sglang-<port>.log is written")
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for /health_generate")
    parser.add_argument("extra", nargs="*", help="extra flags passed to sglang.launch_server after --")


def run(args: argparse.Namespace) -> int:
    from megatron_vr1.config.base import ConfigError
    from megatron_vr1.rollout.sglang_server import SGLangNotInstalled, SGLangServer, ServerSpec

    try:
        spec = ServerSpec(model_path=args.model, host=args.host, port=args.port, api_key=args.api_key,
                          device=args.device, dtype=args.dtype, log_dir=args.log_dir,
                          startup_timeout_s=args.startup_timeout, extra_args=tuple(args.extra))
        if spec.host not in ("127.0.0.1", "localhost", "::1") and not spec.api_key:
            print(f"megatron-vr1 serve-rollout: warning: binding {spec.host} without --api-key exposes the "
                  "weight-update endpoints", file=sys.stderr)
        server = SGLangServer(spec)
        print(f"starting SGLang on {server.endpoint.url} (log: {server.log_path})", flush=True)
        server.start()
    except (ConfigError, SGLangNotInstalled) as e:
        print(f"megatron-vr1 serve-rollout: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, TimeoutError) as e:
        print(f"megatron-vr1 serve-rollout: {e}", file=sys.stderr)
        return 1
    print(f"ready: {server.endpoint.url}  (Ctrl-C stops it)", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(2.0):
            if not server.alive():
                print(f"megatron-vr1 serve-rollout: the server exited; log {server.log_path}:\n{server.log_tail()}",
                      file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0
