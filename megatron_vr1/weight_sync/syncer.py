"""WeightSyncer: one versioned weight update of every rollout server, whatever the transport.

Per sync: pause generation (running requests are aborted and the rollout engine resubmits them, so every
kept completion comes from one weight version) → flush the cache → (GPU colocated:
resume the weight memory) → push every bucket → stamp and verify the new ``weight_version`` on every server
→ flush again (no prefix computed with old weights survives) → (GPU colocated: resume the KV cache) →
continue generation. A failure anywhere still continues generation on every server that answers.

A server can die at any point of this. When a step fails and a server is found down (its process gone, or no
answer), the syncer has the rollout engine restart it (it comes back with the weights it was launched with)
and runs the whole sync again on every server: each phase is idempotent, and a half-paused, half-updated set of
servers is brought to one version. A server that dies between syncs is restarted by the engine while generating,
which then calls ``resync`` to bring it to the current version.

The source of the weights is a zero-argument callable returning an iterable of buckets (the exporter, or a
safetensors reader), not the iterable itself: each push, first or repeated, calls it for a fresh export. What a
failed push left of an export is drained: a collective export must end on every rank.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from megatron_vr1.rollout.sglang_http import Endpoint, SGLangHTTPError, call, weight_version
from megatron_vr1.rollout.sglang_payloads import (continue_generation_payload, memory_payload,
                                                  pause_generation_payload, update_weight_version_payload)
from megatron_vr1.weight_sync.buckets import Bucket
from megatron_vr1.weight_sync.stats import TransportStats

log = logging.getLogger(__name__)

BucketSource = Callable[[], Iterable[Bucket]]

CPU_MEMORY_SKIP_REASON = ("memory release/resume skipped: SGLang's CPU scheduler crashes on "
                          "/release_memory_occupation (it calls torch.cuda synchronize; cpu-stack §2b)")


class Transport(Protocol):
    name: str

    def push(self, endpoints: list[Endpoint], buckets: Iterable[Bucket], version: int) -> TransportStats: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class SyncReport:
    version: int
    stats: TransportStats
    seconds: float
    """Wall time of the whole sync, pause to continue."""


class WeightSyncer:
    """Versioned pushes of one weight source to a fixed set of servers."""

    def __init__(self, endpoints: list[Endpoint], transport: Transport, *, device: str = "cpu",
                 colocated: bool = False, control_timeout_s: float = 120.0, engine=None, max_attempts: int = 3):
        if not endpoints:
            raise ValueError("WeightSyncer needs at least one server endpoint")
        check_reach = getattr(transport, "check_reach", None)
        if check_reach is not None:  # a transport that cannot reach a server fails here, before anything is sent
            check_reach(list(endpoints))
        self.endpoints = list(endpoints)
        self.transport = transport
        self.device = device
        self.colocated = colocated
        self.control_timeout_s = control_timeout_s
        self.max_attempts = max_attempts
        """Tries of one sync (the first, then one per round of restarts)."""
        self.restarts = 0
        """Servers this syncer had restarted because they died inside a sync (monitoring, fault tests)."""
        self.version = 0
        self._source: BucketSource | None = None
        self._engine = engine
        if engine is not None:
            engine.add_resync_hook(self.resync)

    def sync(self, source: BucketSource, version: int | None = None) -> SyncReport:
        """Push ``source()`` as ``version`` (default: current + 1) to every server and verify it landed."""
        version = self.version + 1 if version is None else version
        if version <= self.version:
            raise ValueError(f"weight version {version} is not above the current {self.version}; "
                             "versions must increase monotonically")
        report = self._push_recovering(self.endpoints, source, version)
        self.version, self._source = version, source
        if self._engine is not None:
            self._engine.set_weight_version(version)
        return report

    def resync(self, endpoint: Endpoint) -> None:
        """Bring one (restarted) server to the current version; nothing to do before the first sync."""
        if self._source is None or self.version == 0:
            return
        log.warning("re-syncing %s to weight version %d", endpoint.url, self.version)
        reconnect = getattr(self.transport, "connect", None)
        if reconnect is not None:
            # A restarted server left the broadcast group: rebuild it with every server, then push to all.
            reconnect(self.endpoints)
            self._push_recovering(self.endpoints, self._source, self.version)
        else:
            self._push_recovering([endpoint], self._source, self.version)

    def _push_recovering(self, endpoints: list[Endpoint], source: BucketSource, version: int) -> SyncReport:
        """``_push``, again after restarting the servers that died during it (see the module docstring)."""
        for attempt in range(1, self.max_attempts + 1):
            try:
                return self._push(endpoints, source, version)
            except SGLangHTTPError as e:
                down = self._down(endpoints) if e.retryable and attempt < self.max_attempts else []
                if not down:
                    raise
                log.warning("weight sync to version %d failed (%s); restarting %s and syncing again", version, e,
                            ", ".join(ep.url for ep in down))
                for ep in down:
                    self._engine.restart_endpoint(ep)
                    self.restarts += 1
                reconnect = getattr(self.transport, "connect", None)
                if reconnect is not None:  # restarted servers left the broadcast group
                    reconnect(self.endpoints)
        raise AssertionError("unreachable")

    def _down(self, endpoints: list[Endpoint]) -> list[Endpoint]:
        """The servers that are dead or do not answer (none without an engine to restart them)."""
        if self._engine is None:
            return []
        return [ep for ep in endpoints if self._engine.is_down(ep)]

    def _push(self, endpoints: list[Endpoint], source: BucketSource, version: int) -> SyncReport:
        t0 = time.perf_counter()
        self._each(endpoints, "/pause_generation", pause_generation_payload("abort"))
        # SGLang flushes only an idle scheduler (HTTP 400 otherwise). A pause in abort mode aborts what the
        # scheduler holds, but a request that was still being tokenized reaches it just after and runs to its end
        # on the old weights (and is stamped with the old version): the flush waits for it rather than failing.
        # Once it succeeded nothing runs until /continue_generation, so no completion straddles the update.
        flush = f"/flush_cache?timeout={self.control_timeout_s / 2:g}"  # within the HTTP call's own timeout
        try:
            self._each(endpoints, flush, None)
            self._memory(endpoints, "/resume_memory_occupation", ["weights"])
            buckets = iter(source())
            try:
                stats = self.transport.push(endpoints, buckets, version)
            except Exception:
                for _ in buckets:  # a push cut short: the collective export must still end on every rank
                    pass
                raise
            self._each(endpoints, "/update_weight_version", update_weight_version_payload(version))
            self._each(endpoints, flush, None)
            self._memory(endpoints, "/resume_memory_occupation", ["kv_cache"])
        finally:
            self._each(endpoints, "/continue_generation", continue_generation_payload(), every=True)
        for ep in endpoints:
            got = weight_version(ep, timeout=self.control_timeout_s)
            if got != version:
                raise SGLangHTTPError(f"{ep.url} reports weight_version {got} after syncing {version}")
        return SyncReport(version=version, stats=stats, seconds=time.perf_counter() - t0)

    def release_memory(self) -> None:
        """Colocated GPU servers free weights and KV cache while the trainer runs; skipped on CPU."""
        self._memory(self.endpoints, "/release_memory_occupation", None)

    def _memory(self, endpoints: list[Endpoint], path: str, tags: list[str] | None) -> None:
        if not self.colocated:
            return
        if self.device != "cuda":
            log.info(CPU_MEMORY_SKIP_REASON)
            return
        self._each(endpoints, path, memory_payload(tags))

    def _each(self, endpoints: list[Endpoint], path: str, payload: dict | None, *, every: bool = False) -> None:
        """Call ``path`` on each server in turn; with ``every``, on all of them even when one fails (then the
        first error is raised at the end)."""
        errors = []
        for ep in endpoints:
            try:
                call(ep, path, payload, timeout=self.control_timeout_s)
            except SGLangHTTPError as e:
                if not every:
                    raise
                errors.append(e)
        if errors:
            raise errors[0]

    def close(self) -> None:
        if self._engine is not None:
            self._engine.remove_resync_hook(self.resync)
        self.transport.close()
