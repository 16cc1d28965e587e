"""RewardWorker: score batches in a separate process so the trainer's thread never waits on the GIL.

Parsing is Python (json.loads per completion) and holds the GIL; in a worker process it runs in parallel
with generation / the training step in the main process. ``submit`` returns a ``concurrent.futures.Future``.
The worker uses the "spawn" start method: it never inherits CUDA state, NCCL communicators or threads.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor

from megatron_vr1.config.reward import RewardConfig, RewardRules
from megatron_vr1.rewards.schedule import RefinementSchedule
from megatron_vr1.rewards.score import score_batch
from megatron_vr1.rewards.target import RewardTarget
from megatron_vr1.types import RewardBreakdown


def _score_in_worker(completions, targets, rules, step, schedule) -> tuple[int, list[RewardBreakdown]]:
    # The pid lets callers (and the tests) confirm the work ran outside their process.
    return os.getpid(), score_batch(completions, targets, rules, step, schedule=schedule)


def _unwrap(outer: Future, inner: Future) -> None:
    if outer.cancelled():
        inner.cancel()
    elif outer.exception() is not None:
        inner.set_exception(outer.exception())
    else:
        pid, result = outer.result()
        inner.worker_pid = pid  # type: ignore[attr-defined]
        inner.set_result(result)


class RewardWorker:
    """A pool of reward processes (one by default). Use as a context manager or call ``close()``."""

    def __init__(self, cfg: RewardConfig, *, schedule: RefinementSchedule | None = None, processes: int = 1,
                 start_method: str = "spawn") -> None:
        if processes < 1:
            raise ValueError(f"RewardWorker: processes={processes} is invalid: use >= 1")
        self._rules: RewardRules = cfg.rules()
        self._schedule = schedule
        ctx = multiprocessing.get_context(start_method)
        self._pool = ProcessPoolExecutor(max_workers=processes, mp_context=ctx)

    def submit(self, completions: Sequence[str], targets: Sequence[RewardTarget],
               step: int | None | Sequence[int | None] = None) -> Future:
        """Start scoring; the future's result is ``list[RewardBreakdown]`` (and ``.worker_pid`` is set)."""
        outer = self._pool.submit(_score_in_worker, list(completions), list(targets), self._rules, step,
                                  self._schedule)
        inner: Future = Future()
        inner.set_running_or_notify_cancel()
        outer.add_done_callback(lambda f: _unwrap(f, inner))
        return inner

    def close(self) -> None:
        """Stop the worker processes (waits for submitted batches)."""
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "RewardWorker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
