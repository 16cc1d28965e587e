"""Weight sync into the rollout engine, led by rank 0 and followed by every other rank.

The export of the policy's HF-named weights is collective (TP shards are gathered, pipeline stages broadcast:
convert/exporter.py), but only rank 0 talks to the rollout servers, and only rank 0 knows when it needs the
weights: for the sync after each update, and again whenever a server was lost and restarted (during a sync, or
while generating), which can happen any number of times. So the other ranks do not export on a schedule of
their own; they follow rank 0's commands:

    rank 0:  exports() -> broadcast EXPORT, then export (as often as recovery needs) ... release() -> DONE
    others:  follow(): wait for a command; EXPORT -> take part in one export; DONE -> go on

Rank 0 must consume every export it starts to the end (the other ranks are inside the collective); the weight
syncer drains what a failed push left (weight_sync/syncer.py). In a world of one process there is nobody to
tell: ``exports()`` just exports and ``release`` / ``follow`` do nothing.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch.distributed as dist

from megatron_vr1.training.state import broadcast_object, is_rank0

EXPORT, DONE = "export", "done"


def _alone() -> bool:
    return not dist.is_initialized() or dist.get_world_size() == 1


class WeightExports:
    """The policy's weight buckets, exported on every rank whenever rank 0 asks (see the module docstring)."""

    def __init__(self, policy, bucket_bytes: int):
        self.policy = policy
        self.bucket_bytes = bucket_bytes
        self.exports = 0
        """Exports this rank took part in (a recovery shows as one more than the syncs)."""

    def __call__(self) -> Iterator[list]:
        """Rank 0: start one export on every rank; returns its buckets, which must be consumed to the end."""
        if not _alone():
            broadcast_object(EXPORT)
        self.exports += 1
        return self.policy.export_buckets(self.bucket_bytes)

    def release(self) -> None:
        """Rank 0: the other ranks stop following and go on with the step."""
        if not _alone():
            broadcast_object(DONE)

    def follow(self) -> None:
        """Other ranks: take part in every export rank 0 starts, until it releases them."""
        if _alone():
            return
        while broadcast_object(None) == EXPORT:
            self.exports += 1
            for _ in self.policy.export_buckets(self.bucket_bytes):
                pass


def sync_weights(exports: WeightExports, engine, version: int) -> int:
    """Bring rank 0's rollout engine to the policy's current weights as ``version``; collective (every rank
    calls it, only rank 0 passes an engine). Returns the number of tensors sent (0 on other ranks)."""
    if not is_rank0():
        exports.follow()
        return 0
    if hasattr(engine, "sync"):  # SGLang servers: the syncer pushes buckets, and re-exports after a restart
        sent = engine.sync(exports, version)
    else:  # the in-process engine: one versioned update over all buckets
        sent = engine.update_weights((nt for bucket in exports() for nt in bucket), version)
    exports.release()
    return sent
