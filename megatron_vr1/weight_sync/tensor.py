"""Transport (a): /update_weights_from_tensor, the colocated path.

Each bucket is flattened into one fresh buffer (SGLang's ``flattened_bucket`` load format), and the buffer is
pickled with torch's ForkingPickler, which sends a handle rather than the bytes:
- on GPU a CUDA IPC handle; the buffer is never reused (a new one per bucket) and is only dropped after the
  HTTP call returned, then ``torch.cuda.ipc_collect()`` frees what the server released (slime PR #929, #1731);
- on CPU a shared-memory file name. torch's default fd-passing strategy crashes SGLang's scheduler
  ("digest sent was rejected", cpu-stack §2b), so the process switches to the ``file_system`` strategy.

The flattened metadata travels as ``types.SimpleNamespace`` objects, which SGLang's SafeUnpickler accepts and
reads by attribute, so the trainer never imports sglang.
"""

from __future__ import annotations

import base64
import io
import time
import types
from collections.abc import Iterable
from multiprocessing.reduction import ForkingPickler

import torch
import torch.multiprocessing

from megatron_vr1.rollout.hosts import TransportUnreachable, first_elsewhere, host_of
from megatron_vr1.rollout.sglang_http import Endpoint, call
from megatron_vr1.rollout.sglang_payloads import update_from_tensor_payload
from megatron_vr1.weight_sync.buckets import Bucket, bucket_nbytes, flatten_bucket
from megatron_vr1.weight_sync.stats import TransportStats


def serialize(obj: object) -> str:
    """ForkingPickler + base64: SGLang's ``MultiprocessingSerializer.serialize(obj, output_str=True)``.

    Switches this process to the ``file_system`` sharing strategy first: CPU tensors are then sent as shared
    memory file names, which any local process can open (fd passing needs the receiver to be our child).
    """
    if torch.multiprocessing.get_sharing_strategy() != "file_system":
        torch.multiprocessing.set_sharing_strategy("file_system")
    buf = io.BytesIO()
    ForkingPickler(buf).dump(obj)
    return base64.b64encode(buf.getvalue()).decode()


def flattened_message(bucket: Bucket, device: torch.device) -> tuple[dict, torch.Tensor]:
    """The object SGLang's ``_update_weights_from_flattened_bucket`` expects, and the buffer it points to."""
    flat, entries = flatten_bucket(bucket)
    flat = flat.to(device)
    metadata = [types.SimpleNamespace(name=e.name, shape=e.shape, dtype=e.dtype, start_idx=e.start_idx,
                                      end_idx=e.end_idx, numel=e.numel) for e in entries]
    return {"flattened_tensor": flat, "metadata": metadata}, flat


class TensorTransport:
    """Push buckets by handle through /update_weights_from_tensor to servers on this host."""

    name = "tensor"

    def __init__(self, *, device: str = "cpu", flattened: bool = True, timeout_s: float = 300.0):
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device={device!r} is invalid: use 'cpu' or 'cuda' (where the server's weights live)")
        self.device = torch.device(device)
        self.flattened = flattened
        self.timeout_s = timeout_s

    def check_reach(self, endpoints: list[Endpoint]) -> None:
        """Shared-memory and CUDA-IPC handles open only on this host: refuse a server elsewhere before sending."""
        if (ep := first_elsewhere(endpoints)) is not None:
            raise TransportUnreachable(
                f"rollout.sync_transport=tensor hands the server shared-memory handles, which only a server on "
                f"this host can open, and {ep.url} runs on {host_of(ep)}: use rollout.sync_transport=distributed "
                "(a process group the server joins) or disk (a filesystem both hosts share)")

    def push(self, endpoints: list[Endpoint], buckets: Iterable[Bucket], version: int) -> TransportStats:
        """Send every bucket to every server (each server is one TP rank); each call is tagged ``version``."""
        stats = TransportStats(self.name)
        t0 = time.perf_counter()
        for bucket in buckets:
            if self.flattened:
                message, keep_alive = flattened_message(bucket, self.device)
            else:
                keep_alive = [(n, t.detach().to(self.device).contiguous()) for n, t in bucket]
                message = keep_alive
            payload = update_from_tensor_payload([serialize(message)], version=version, flattened=self.flattened,
                                                 flush_cache=False)
            for ep in endpoints:
                call(ep, "/update_weights_from_tensor", payload, timeout=self.timeout_s)
            # The server has copied the weights when the call returns; only now may the buffer go.
            del message, keep_alive
            if self.device.type == "cuda":
                torch.cuda.ipc_collect()
            stats.add_bucket(bucket_nbytes(bucket), len(bucket))
        stats.seconds = time.perf_counter() - t0
        return stats

    def close(self) -> None:
        pass
