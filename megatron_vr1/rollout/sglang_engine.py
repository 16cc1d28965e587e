"""SGLangEngine: the RolloutEngine over one or more SGLang HTTP servers, with recovery.

- A request with ``n`` samples yields completions ``{request_id}-{i}``. With ``parallel_sampling`` (servers we
  launch) an unseeded one is sent as one SGLang request with ``n``: its image is processed and its prompt
  prefilled once, and n copies decode from the cached prefix (2.8x faster rollouts of the CPU demo than n
  separate requests). Seeded requests, and every request without it, are expanded client-side into n items
  (seeds ``seed + i``) sent as batched /generate calls. Either way to the least-loaded healthy server.
- A batch that fails because a server died or timed out triggers recovery of that server: a server we launched
  is restarted (same port), an attached one is waited for; then every registered re-sync hook runs (the weight
  syncer pushes the current weights and version), and only the completions without a result are retried.
  Results are keyed by completion id, so no completion is counted twice or lost.
- With several servers, a server under recovery takes no new batches: the failed items are retried at once on
  the healthy ones while the recovery runs in the background, and ``generate`` returns only after it finished
  (so the restarted server is back at the current weight version). With one server the retry waits for it.
- Requests the server aborts (a weight sync pauses generation in "abort" mode) are resubmitted with the same
  id, and so are generated with the new weights: nothing sampled from a half-updated model is kept.
- Logprobs are the server's own at every emitted token, a generated ``<|image_pad|>`` included (SGLang scores
  it like any other token; it equals the in-process reference to 1e-5). The trainer leaves completions that
  generated a vision token out of the loss (training/batch.py). Overwriting these logprobs with 0.0, as this
  engine once did, was the intermittent post-sync logprob gap of issue #7.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from megatron_vr1.rollout.engine import GenerationRequest, collapse_image_pads
from megatron_vr1.rollout.sglang_http import Endpoint, SGLangHTTPError, call, is_healthy, parse_weight_version
from megatron_vr1.rollout.sglang_payloads import GenerateItem, generate_payload
from megatron_vr1.rollout.sglang_server import SGLangServer
from megatron_vr1.types import Completion

log = logging.getLogger(__name__)

ResyncHook = Callable[[Endpoint], None]
MAX_GENERATE_RESPONSE_BYTES = 256 << 20
MAX_ABORT_RETRIES = 20


def is_aborted(out: dict[str, Any]) -> bool:
    """SGLang returns requests it aborted (pause in "abort" mode, shutdown) with finish_reason type "abort"."""
    finish = (out.get("meta_info") or {}).get("finish_reason")
    return isinstance(finish, dict) and finish.get("type") == "abort"


class ServerLost(RuntimeError):
    """A server died or stopped answering and could not be brought back."""


class _Slot:
    """One server as the client sees it: where it is, how busy, and how to bring it back."""

    def __init__(self, target: SGLangServer | Endpoint):
        self.server = target if isinstance(target, SGLangServer) else None
        self.endpoint = target.endpoint if isinstance(target, SGLangServer) else target
        self.inflight = 0
        self.epoch = 0
        """Bumped by each recovery, so concurrent failures of one crash recover it once."""
        self.recovery: asyncio.Task | None = None
        """The running recovery; while set, the slot takes no new batches."""
        self.lost: BaseException | None = None
        """Why a recovery failed; a lost server takes no more batches in this generate() call."""
        self.started: list[asyncio.Task] = []
        """Every recovery started during this generate() call: awaited (and their errors raised) at its end."""


def expand_requests(requests: Sequence[GenerationRequest], *, parallel_sampling: bool = False) -> list[GenerateItem]:
    """The GenerateItems of ``requests``; completion ids are ``{request_id}-{i}`` either way.

    With ``parallel_sampling`` an unseeded request with n > 1 is one item of n samples (SGLang processes its image
    and prefills it once, then decodes n copies from the cached prefix). Otherwise, and for seeded requests (n
    samples need n seeds), each completion is its own item with seed ``seed + i``.
    """
    seen: set[str] = set()
    items = []
    for req in requests:
        if req.request_id in seen:
            raise ValueError(f"request_id {req.request_id!r} appears twice in one generate() call; ids must be unique")
        seen.add(req.request_id)
        s = req.sampling
        common = dict(prompt=collapse_image_pads(req.prompt), image=req.image, temperature=s.temperature,
                      top_p=s.top_p, max_new_tokens=s.max_new_tokens, stop=s.stop,
                      return_logprob=req.return_logprob, ignore_eos=s.ignore_eos)
        ids = tuple(f"{req.request_id}-{i}" for i in range(s.n))
        if parallel_sampling and s.n > 1 and s.seed is None:
            items.append(GenerateItem(rid=req.request_id, n=s.n, result_ids=ids, **common))
            continue
        for i, rid in enumerate(ids):
            items.append(GenerateItem(rid=rid, seed=None if s.seed is None else s.seed + i, **common))
    return items


def still_missing(item: GenerateItem, results: dict[str, Completion]) -> GenerateItem | None:
    """What is left to generate of ``item``: None when every completion has a result, the item itself when none
    has, else an item for just the missing ones (a sync aborted some of a parallel-sampling group)."""
    missing = tuple(rid for rid in item.ids if rid not in results)
    if not missing:
        return None
    if len(missing) == len(item.ids):
        return item
    if len(missing) == 1:
        return dataclasses.replace(item, rid=missing[0], n=1, result_ids=())
    return dataclasses.replace(item, n=len(missing), result_ids=missing)


def fill_missing_logprobs(logprobs: Sequence[float | None]) -> list[float]:
    """The server's logprobs as floats, 0.0 where it gave none. Nothing else is changed: at an emitted
    ``<|image_pad|>`` the value is the model's real logprob of that token, not a placeholder."""
    return [0.0 if lp is None else float(lp) for lp in logprobs]


def to_completion(rid: str, item: GenerateItem, sample_id: str, out: dict[str, Any]) -> Completion:
    """Turn one /generate result (completion ``rid`` of ``item``) into a Completion record."""
    meta = out.get("meta_info") or {}
    token_ids = tuple(int(t) for t in out.get("output_ids") or ())
    entries = meta.get("output_token_logprobs") or []
    if item.return_logprob and len(entries) != len(token_ids):
        raise SGLangHTTPError(f"request {rid}: {len(entries)} logprobs for {len(token_ids)} tokens")
    raw = [e[0] for e in entries] if entries else [None] * len(token_ids)
    finish = meta.get("finish_reason") or {}
    return Completion(sample_id=sample_id, request_id=rid, text=out.get("text", ""), token_ids=token_ids,
                      logprobs=tuple(fill_missing_logprobs(raw)),
                      finish_reason=str(finish.get("type", "abort")) if isinstance(finish, dict) else str(finish),
                      weight_version=parse_weight_version(meta.get("weight_version")))


def image_pad_id_of(model_path: str | Path) -> int | None:
    """``image_token_id`` from a checkpoint's config.json (151655 for Qwen2.5-VL; the tiny model uses 12)."""
    try:
        return int(json.loads(Path(model_path, "config.json").read_text())["image_token_id"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


class SGLangEngine:
    """RolloutEngine over SGLang servers (launched ``SGLangServer``s and/or attached ``Endpoint``s)."""

    def __init__(self, servers: Sequence[SGLangServer | Endpoint], *, image_pad_id: int | None,
                 request_timeout_s: float = 300.0, max_batch: int = 16, max_attempts: int = 3,
                 inline_images: bool = True, recovery_timeout_s: float = 600.0, parallel_sampling: bool = False):
        if not servers:
            raise ValueError("SGLangEngine needs at least one server or endpoint")
        if max_batch < 1 or max_attempts < 1:
            raise ValueError("max_batch and max_attempts must be >= 1")
        self._targets = list(servers)
        self.image_pad_id = image_pad_id
        """The checkpoint's ``<|image_pad|>`` id, for callers that look for generated vision tokens; the logprobs
        at such tokens are reported as the server gives them."""
        self.request_timeout_s = request_timeout_s
        self.max_batch = max_batch
        self.max_attempts = max_attempts
        self.inline_images = inline_images
        self.recovery_timeout_s = recovery_timeout_s
        self.parallel_sampling = parallel_sampling
        """Send each unseeded n-sample request as one SGLang request with ``n`` (see expand_requests). Only for
        servers that pass image features by pickle (ServerSpec.shm_mm_features=False): with SGLang's shared-memory
        transport the n copies of a prompt with an image share one segment and the scheduler crashes."""
        self._weight_version = 0
        self._resync_hooks: list[ResyncHook] = []
        self.recoveries = 0
        self.inflight = 0
        """Completions sent to a server and not yet answered, over all servers (monitoring, fault tests)."""
        self.inflight_by_url: dict[str, int] = {ep.url: 0 for ep in self.endpoints}
        """The same, per server URL."""
        self.served_by_url: dict[str, int] = {ep.url: 0 for ep in self.endpoints}
        """Completions kept from each server since the engine was made (load balance, monitoring)."""
        self.aborted = 0
        """Completions a server aborted (a weight sync paused it) and that were resubmitted (monitoring)."""

    # -- RolloutEngine ---------------------------------------------------------------------------------------
    @property
    def weight_version(self) -> int:
        return self._weight_version

    def set_weight_version(self, version: int) -> None:
        """Called by the weight syncer once every server has verified ``version``."""
        self._weight_version = version

    @property
    def endpoints(self) -> list[Endpoint]:
        return [t.endpoint if isinstance(t, SGLangServer) else t for t in self._targets]

    def add_resync_hook(self, hook: ResyncHook) -> None:
        """``hook(endpoint)`` runs after a server is recovered, before requests are retried on it."""
        self._resync_hooks.append(hook)

    def remove_resync_hook(self, hook: ResyncHook) -> None:
        if hook in self._resync_hooks:
            self._resync_hooks.remove(hook)

    def generate(self, requests: list[GenerationRequest]) -> list[list[Completion]]:
        """Blocking: one list of ``request.sampling.n`` completions per request, in request order."""
        return asyncio.run(self.agenerate(requests))

    def close(self) -> None:
        for t in self._targets:
            if isinstance(t, SGLangServer):
                t.stop()

    # -- async core ------------------------------------------------------------------------------------------
    async def agenerate(self, requests: list[GenerationRequest]) -> list[list[Completion]]:
        items = expand_requests(requests, parallel_sampling=self.parallel_sampling)
        sample_of = {f"{r.request_id}-{i}": r.sample_id for r in requests for i in range(r.sampling.n)}
        results: dict[str, Completion] = {}
        slots = [_Slot(t) for t in self._targets]
        timeout = aiohttp.ClientTimeout(total=self.request_timeout_s)
        singles = [it for it in items if it.n == 1]
        # A parallel-sampling group is a request of its own: SGLang warms the prefixes of a batch one by one.
        batches = [[it] for it in items if it.n > 1] + [singles[i:i + self.max_batch]
                                                         for i in range(0, len(singles), self.max_batch)]
        async with aiohttp.ClientSession(timeout=timeout) as session:
            try:
                await asyncio.gather(*(self._run_batch(session, slots, b, sample_of, results) for b in batches))
            finally:
                # A server recovered in the background is back (restarted, re-synced) before generate returns.
                started = [t for s in slots for t in s.started]
                if started:
                    await asyncio.gather(*started)
        return [[results[f"{req.request_id}-{i}"] for i in range(req.sampling.n)] for req in requests]

    async def _pick(self, slots: list[_Slot]) -> _Slot:
        """The least-loaded server neither under recovery nor lost; waits for a recovery when every server that
        is not lost is in one, and raises ServerLost when every server is lost."""
        while True:
            ready = [s for s in slots if s.recovery is None and s.lost is None]
            if ready:
                return min(ready, key=lambda s: s.inflight)
            running = {s.recovery for s in slots if s.recovery is not None}
            if not running:
                raise ServerLost(f"every server is lost; last error: {slots[-1].lost}") from slots[-1].lost
            await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)

    async def _run_batch(self, session, slots, batch, sample_of, results) -> None:
        failures = aborts = 0
        while True:
            todo = [left for it in batch if (left := still_missing(it, results)) is not None]
            if not todo:
                return
            slot = await self._pick(slots)
            epoch = slot.epoch
            url = slot.endpoint.url
            count = sum(it.n for it in todo)
            slot.inflight += count
            self.inflight += count
            self.inflight_by_url[url] = self.inflight_by_url.get(url, 0) + count
            try:
                outs = await self._post_generate(session, slot.endpoint, todo)
            except SGLangHTTPError as e:
                failures += 1
                if not e.retryable or failures >= self.max_attempts:
                    raise
                log.warning("generate on %s failed (%s); recovering the server and retrying %d completions",
                            url, e, count)
                task = self._start_recovery(slot, epoch)
                if task is not None and not any(s.recovery is None and s.lost is None for s in slots):
                    await asyncio.wait({task})  # no other server to retry on: wait for this one
                continue
            finally:
                slot.inflight -= count
                self.inflight -= count
                self.inflight_by_url[url] -= count
            # A batch of single items comes back with our ids; a parallel-sampling group with SGLang's own, in order.
            wanted = [(rid, it) for it in todo for rid in it.ids]
            by_id = {str((o.get("meta_info") or {}).get("id")): o for o in outs}
            for (rid, it), out in zip(wanted, outs):
                out = by_id.get(rid, out)
                if is_aborted(out):
                    self.aborted += 1
                    continue  # retried below: a weight sync paused the server in "abort" mode
                if rid not in results:
                    results[rid] = to_completion(rid, it, sample_of[rid], out)
                    self.served_by_url[url] = self.served_by_url.get(url, 0) + 1
            if any(still_missing(it, results) is not None for it in todo):
                aborts += 1
                if aborts > MAX_ABORT_RETRIES:
                    raise SGLangHTTPError(f"{url} aborted the same requests {aborts} times")
                await asyncio.sleep(0.2)

    async def _post_generate(self, session: aiohttp.ClientSession, endpoint: Endpoint,
                             todo: list[GenerateItem]) -> list[dict[str, Any]]:
        payload = generate_payload(todo, inline_images=self.inline_images)
        url = endpoint.route("/generate")
        try:
            async with session.post(url, json=payload, headers=endpoint.headers()) as resp:
                body = await resp.content.read(MAX_GENERATE_RESPONSE_BYTES + 1)
                status = resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as e:
            raise SGLangHTTPError(f"POST {url} failed: {type(e).__name__}: {e}", retryable=True) from None
        if status != 200:
            raise SGLangHTTPError(f"POST {url} -> HTTP {status}: {body[:2000].decode(errors='replace')}",
                                  status=status, retryable=status >= 500)
        if len(body) > MAX_GENERATE_RESPONSE_BYTES:
            raise SGLangHTTPError(f"POST {url}: response over {MAX_GENERATE_RESPONSE_BYTES} bytes; use smaller batches")
        outs = json.loads(body)
        outs = outs if isinstance(outs, list) else [outs]
        expected = sum(it.n for it in todo)
        if len(outs) != expected:
            raise SGLangHTTPError(f"POST {url}: {len(outs)} results for {expected} completions")
        return outs

    def _start_recovery(self, slot: _Slot, seen_epoch: int) -> asyncio.Task | None:
        """Recover ``slot`` in the background, once per crash: a failure seen before an already finished
        recovery (the epoch moved on) or during a running one starts nothing."""
        if slot.recovery is not None:
            return slot.recovery
        if slot.epoch != seen_epoch:
            return None

        async def recover() -> None:
            try:
                await asyncio.to_thread(self.recover_endpoint, slot.endpoint)
            except BaseException as e:
                slot.lost = e
                raise
            finally:
                slot.epoch += 1
                slot.recovery = None

        slot.recovery = asyncio.get_running_loop().create_task(recover())
        slot.started.append(slot.recovery)
        return slot.recovery

    def _target(self, endpoint: Endpoint) -> SGLangServer | Endpoint:
        for t in self._targets:
            if (t.endpoint if isinstance(t, SGLangServer) else t) == endpoint:
                return t
        raise KeyError(f"{endpoint.url} is not one of this engine's servers")

    def is_down(self, endpoint: Endpoint, timeout: float = 10.0) -> bool:
        """True when the server at ``endpoint`` is dead or does not answer. Asks /model_info, which its HTTP
        process answers itself: /health_generate would wait while a weight sync pauses generation."""
        target = self._target(endpoint)
        if isinstance(target, SGLangServer) and not target.alive():
            return True
        try:
            call(endpoint, "/model_info", method="GET", timeout=timeout)
        except SGLangHTTPError:
            return True
        return False

    def restart_endpoint(self, endpoint: Endpoint) -> None:
        """Bring one server back with the weights it starts from: restart ours (same port, so the same URL), or
        wait for an attached one to answer again. Its weights must then be synced (``recover_endpoint``)."""
        self.recoveries += 1
        target = self._target(endpoint)
        if isinstance(target, SGLangServer):
            target.restart()
            return
        deadline = time.monotonic() + self.recovery_timeout_s
        while not is_healthy(endpoint):
            if time.monotonic() > deadline:
                raise ServerLost(f"{endpoint.url} did not become healthy within {self.recovery_timeout_s:.0f} s")
            time.sleep(2.0)

    def recover_endpoint(self, endpoint: Endpoint) -> None:
        """Bring one server back, then re-sync its weights (every registered hook: the weight syncer)."""
        self.restart_endpoint(endpoint)
        for hook in self._resync_hooks:
            hook(endpoint)
