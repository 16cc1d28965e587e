"""Transport (b): /init_weights_update_group + /update_weights_from_distributed (disaggregated servers).

The trainer is rank 0 of a dedicated process group whose other ranks are the servers' TP ranks; gloo on CPU,
NCCL on GPU. Per bucket: one HTTP call tells every server the names/dtypes/shapes of what comes, and one
broadcast of the flattened bucket carries the bytes (SGLang's ``flattened_bucket`` distributed format).

Hang safety (anchors pain point 3): NCCL/gloo broadcasts have no useful timeout and the HTTP call only returns
after the server received the broadcast, so the broadcast runs in a background thread while the timed HTTP
calls run on the calling thread; a push that does not finish in ``timeout_s`` raises instead of hanging. A
lock serializes pushes so two syncs can never interleave broadcasts on one group (vime PR #170).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_vr1.parallel.env import free_port
from megatron_vr1.rollout.hosts import (TransportUnreachable, first_elsewhere, host_of, route_address,
                                        server_tensor_parallel)
from megatron_vr1.rollout.sglang_http import Endpoint, SGLangHTTPError, call
from megatron_vr1.rollout.sglang_payloads import (destroy_group_payload, init_group_payload,
                                                  update_from_distributed_payload)
from megatron_vr1.weight_sync.buckets import Bucket, bucket_nbytes, flatten_bucket
from megatron_vr1.weight_sync.stats import TransportStats


def init_custom_process_group(*, backend: str, init_method: str, world_size: int, rank: int, group_name: str,
                              timeout: timedelta) -> dist.ProcessGroup:
    """A process group outside the default world, the way SGLang's servers build theirs.

    ``dist.new_group`` needs a default group that contains the servers, which a trainer never has; SGLang
    (utils/common.py ``init_custom_process_group``) rendezvouses a standalone group through a TCP store
    instead, and the trainer side must do the same for the two ends to meet (cpu-stack §2b).
    This mirrors SGLang 0.5.10's helper on torch's private ``_new_process_group_helper``.
    """
    from torch.distributed.distributed_c10d import (Backend, PrefixStore, _new_process_group_helper, _world,
                                                    rendezvous)

    store, rank, world_size = next(rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    pg, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), store, group_name=group_name,
                                      backend_options=None, timeout=timeout)
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


class DistributedTransport:
    """Broadcast buckets from this process to every server through a dedicated process group."""

    name = "distributed"

    def __init__(self, *, device: str = "cpu", master_address: str = "", group_name: str = "vr1_weights",
                 ranks_per_server: int = 0, timeout_s: float = 300.0):
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device={device!r} is invalid: use 'cpu' (gloo) or 'cuda' (NCCL)")
        self.device = torch.device(device)
        self.backend = "nccl" if self.device.type == "cuda" else "gloo"
        self.master_address = master_address
        """Where the servers reach this process's end of the group; "" = this host's address that routes to the
        first server (127.0.0.1 for a server on this host)."""
        self.group_address = ""
        """The address the current group listens on."""
        self.group_name = group_name
        self.ranks_per_server = ranks_per_server
        """Group ranks each server brings (its TP ranks); 0 = ask each server (/server_info tp_size)."""
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._group: dist.ProcessGroup | None = None
        self._members: list[Endpoint] = []
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="weight-sync")

    def check_reach(self, endpoints: list[Endpoint]) -> None:
        """A loopback group address cannot be reached from a server on another host: refuse before sending."""
        if not self.master_address.startswith("127.") or (ep := first_elsewhere(endpoints)) is None:
            return
        raise TransportUnreachable(
            f"rollout.sync_transport=distributed: {ep.url} runs on another host ({host_of(ep)}) and cannot "
            f"reach the weight-update group at {self.master_address}; leave the group address empty "
            "(this host's address that routes to the server is used) or give a routable one")

    def connect(self, endpoints: list[Endpoint]) -> None:
        """(Re)build the group with exactly these servers; an old group is torn down on both sides first."""
        with self._lock:
            self._disconnect()
            self.check_reach(endpoints)
            address = self.master_address or route_address(host_of(endpoints[0]))
            ranks = [self.ranks_per_server or server_tensor_parallel(ep, timeout=self.timeout_s) for ep in endpoints]
            offsets = [1 + sum(ranks[:i]) for i in range(len(endpoints))]
            port, world = free_port(address), 1 + sum(ranks)
            calls = [self._pool.submit(call, ep, "/init_weights_update_group", init_group_payload(
                master_address=address, master_port=port, rank_offset=offset, world_size=world,
                group_name=self.group_name, backend=self.backend), timeout=self.timeout_s)
                for ep, offset in zip(endpoints, offsets)]
            self._group = init_custom_process_group(
                backend=self.backend, init_method=f"tcp://{address}:{port}", world_size=world, rank=0,
                group_name=self.group_name, timeout=timedelta(seconds=self.timeout_s))
            self.group_address = address
            for c in calls:
                c.result(timeout=self.timeout_s)
            self._members = list(endpoints)

    def push(self, endpoints: list[Endpoint], buckets: Iterable[Bucket], version: int) -> TransportStats:
        """Broadcast every bucket to the group's servers (which must be ``endpoints``)."""
        if self._group is None or set(endpoints) != set(self._members):
            self.connect(endpoints)
        stats = TransportStats(self.name)
        t0 = time.perf_counter()
        with self._lock:
            for bucket in buckets:
                self._push_bucket(bucket, version)
                stats.add_bucket(bucket_nbytes(bucket), len(bucket))
        stats.seconds = time.perf_counter() - t0
        return stats

    def _push_bucket(self, bucket: Bucket, version: int) -> None:
        flat, entries = flatten_bucket(bucket)
        flat = flat.to(self.device)
        payload = update_from_distributed_payload(
            names=[e.name for e in entries], dtypes=[str(e.dtype).removeprefix("torch.") for e in entries],
            shapes=[list(e.shape) for e in entries], group_name=self.group_name, version=version, flattened=True,
            flush_cache=False)
        calls = [self._pool.submit(call, ep, "/update_weights_from_distributed", payload, timeout=self.timeout_s)
                 for ep in self._members]
        done = threading.Event()
        errors: list[BaseException] = []

        def broadcast() -> None:
            try:
                dist.broadcast(flat, src=0, group=self._group)
            except BaseException as e:  # reported on the calling thread
                errors.append(e)
            finally:
                done.set()

        threading.Thread(target=broadcast, name="weight-broadcast", daemon=True).start()
        deadline = time.monotonic() + self.timeout_s
        for c in calls:
            c.result(timeout=max(1.0, deadline - time.monotonic()))
        if not done.wait(timeout=max(1.0, deadline - time.monotonic())):
            self._group = None  # a wedged group cannot be reused; the next push reconnects
            raise SGLangHTTPError(f"weight broadcast did not finish within {self.timeout_s:.0f} s", retryable=True)
        if errors:
            self._group = None
            raise SGLangHTTPError(f"weight broadcast failed: {errors[0]}", retryable=True)

    def _disconnect(self) -> None:
        for ep in self._members:
            try:
                call(ep, "/destroy_weights_update_group", destroy_group_payload(self.group_name), timeout=30.0)
            except SGLangHTTPError:
                pass  # a dead or restarted server has no group left to destroy
        if self._group is not None:
            try:
                dist.destroy_process_group(self._group)
            except (RuntimeError, ValueError):
                pass
        self._group, self._members = None, []

    def close(self) -> None:
        with self._lock:
            self._disconnect()
        self._pool.shutdown(wait=False)
