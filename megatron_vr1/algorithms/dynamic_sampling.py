"""Dynamic sampling (DAPO): drop groups whose rewards are all equal (zero advantage, no gradient) and keep
generating until the batch holds the requested number of informative groups.

Usage in the loop::

    sampler = DynamicSampler(target_groups=16, max_rounds=4)
    while not sampler.ready():
        groups, rewards = generate_and_score(...)
        sampler.add(groups, zero_variance=zero_variance_groups(rewards=rewards, group_size=G).tolist())
    batch = sampler.pop_batch()
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Generic, TypeVar

T = TypeVar("T")

_COUNTERS = ("groups_seen", "groups_dropped", "groups_kept", "groups_surplus", "refill_rounds", "batches",
             "partial_batches")


class DynamicSampler(Generic[T]):
    """Accumulates informative groups for one training batch, with running counters.

    ``max_rounds`` caps the generation rounds per batch (the first round plus refills); once reached,
    ``ready()`` is True and ``pop_batch()`` returns what was kept, possibly fewer groups (counted in
    ``partial_batches``). Groups beyond ``target_groups`` are discarded, not carried over: they were sampled
    by this step's weights and would be off-policy next step (counted in ``groups_surplus``).
    """

    def __init__(self, *, target_groups: int, max_rounds: int | None = None) -> None:
        if target_groups < 1:
            raise ValueError(f"target_groups={target_groups} is invalid: use >= 1 (prompts per step)")
        if max_rounds is not None and max_rounds < 1:
            raise ValueError(f"max_rounds={max_rounds} is invalid: use >= 1 or None (no cap)")
        self.target_groups = target_groups
        self.max_rounds = max_rounds
        self._buffer: list[T] = []
        self._rounds_this_batch = 0
        self.counters = {name: 0 for name in _COUNTERS}

    def add(self, groups: Sequence[T], *, zero_variance: Sequence[bool]) -> int:
        """Offer one generation round; keeps the groups with reward variance. Returns how many were kept."""
        if len(groups) != len(zero_variance):
            raise ValueError(f"{len(groups)} groups but {len(zero_variance)} zero_variance flags: pass one flag "
                             "per group")
        if self._rounds_this_batch >= 1:
            self.counters["refill_rounds"] += 1
        self._rounds_this_batch += 1
        kept = [g for g, flat in zip(groups, zero_variance) if not flat]
        self._buffer.extend(kept)
        self.counters["groups_seen"] += len(groups)
        self.counters["groups_dropped"] += len(groups) - len(kept)
        return len(kept)

    @property
    def num_buffered(self) -> int:
        return len(self._buffer)

    def ready(self) -> bool:
        """True when the batch is full, or the round cap is reached."""
        if len(self._buffer) >= self.target_groups:
            return True
        return self.max_rounds is not None and self._rounds_this_batch >= self.max_rounds

    def pop_batch(self) -> list[T]:
        """The batch's groups (``target_groups`` of them unless the round cap cut it short); resets the buffer."""
        if not self.ready():
            raise RuntimeError(f"pop_batch() before ready(): {len(self._buffer)}/{self.target_groups} groups; "
                               "add() more rounds first")
        batch = self._buffer[:self.target_groups]
        self.counters["groups_surplus"] += len(self._buffer) - len(batch)
        self.counters["groups_kept"] += len(batch)
        self.counters["batches"] += 1
        self.counters["partial_batches"] += int(len(batch) < self.target_groups)
        self._buffer = []
        self._rounds_this_batch = 0
        return batch

    def state_dict(self) -> dict[str, Any]:
        """JSON-able counters. Checkpoints are taken between steps, when the buffer is empty."""
        if self._buffer:
            raise RuntimeError("state_dict() with groups buffered mid-batch: checkpoint after pop_batch()")
        return {"target_groups": self.target_groups, "max_rounds": self.max_rounds, "counters": dict(self.counters)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state.get("counters", {})) - set(_COUNTERS)
        if unknown:
            raise ValueError(f"dynamic sampler state has unknown counters {sorted(unknown)}")
        self.counters.update({k: int(v) for k, v in state["counters"].items()})
