"""A streaming, rank-sharded sampler over ``num_items`` rows, resumable from a checkpoint.

Epoch ``e`` is a permutation drawn from ``(seed, e)`` alone, so every rank computes the same one without
communication; rank ``r`` of ``world_size`` takes positions ``r, r + world_size, ...`` of it, truncated so
all ranks see the same number of rows per epoch (the few left over rotate as the permutation changes).
The position (epoch, offset) is all the state there is: ``state_dict`` / ``load_state_dict`` resume exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(slots=True)
class ShardedSampler:
    """Yields (epoch, row index) forever (or for ``num_epochs``), reshuffled every epoch."""

    num_items: int
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    shuffle: bool = True
    epoch: int = 0
    offset: int = 0
    """Rows of ``epoch`` this rank has already yielded."""

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank={self.rank}, world_size={self.world_size} is invalid: need 0 <= rank < world_size")
        if self.num_items < self.world_size:
            raise ValueError(f"num_items={self.num_items} is invalid: the dataset needs at least world_size="
                             f"{self.world_size} rows so every rank gets one")

    @property
    def per_rank(self) -> int:
        """Rows each rank sees per epoch."""
        return self.num_items // self.world_size

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's row indices of ``epoch`` in order."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
        else:
            order = np.arange(self.num_items)
        return order[self.rank::self.world_size][: self.per_rank]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        while True:
            indices = self.epoch_indices(self.epoch)
            while self.offset < len(indices):
                i = int(indices[self.offset])
                self.offset += 1
                yield self.epoch, i
            self.epoch += 1
            self.offset = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "num_items": self.num_items,
                "world_size": self.world_size, "rank": self.rank}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at the saved position. The dataset, seed and world size must be those of the save."""
        for key in ("seed", "num_items", "world_size"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]} but this run has {getattr(self, key)}; "
                                 f"resume with the same data, data.seed and world size")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
