"""A checkpoint save on several ranks that fails on one fails on all, with one message.

Each phase of a save (prepare the partial directory, write, publish) ends with an all-reduce of failure flags
instead of a barrier, so no rank waits in a barrier for one that raised. On a failure anywhere, rank 0 removes
the partial directory, and a failure for lack of room (``checkpoint/space.py``) becomes one
``CheckpointSpaceError`` with the same message on every rank.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_vr1.checkpoint import layout, space

log = logging.getLogger(__name__)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def saved_bytes(sharded: dict[str, Any]) -> int:
    """Bytes of the tensors this rank writes: main replicas only (the others are written by another rank).
    The files are slightly larger (headers, metadata), so this is a lower bound, good for "about"."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedBase, is_main_replica

    def tensors(x):
        if isinstance(x, torch.Tensor):
            yield x
        elif isinstance(x, dict):
            for v in x.values():
                yield from tensors(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                yield from tensors(v)

    return sum(t.nbytes for item in nested_values(sharded)
               if isinstance(item, ShardedBase) and is_main_replica(item.replica_id) for t in tensors(item.data))


def _collective_device() -> torch.device:
    """Where a tensor for a collective on the default group lives: NCCL reduces CUDA tensors only."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_ints(values: list[int], op=dist.ReduceOp.SUM) -> list[int]:
    t = torch.tensor(values, dtype=torch.int64, device=_collective_device())
    if dist.is_initialized():
        dist.all_reduce(t, op=op)
    return [int(v) for v in t.tolist()]


def _from_rank0(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


_NO_LIMIT = 1 << 62


def _size_limit(own_code: int | None) -> int | None:
    """The smallest file-size limit among the ranks whose write hit one (collective; EFBIG agreed): the message
    is written on rank 0, which may not be the rank that hit it."""
    own = space.file_size_limit() if own_code == errno.EFBIG else None
    limit = all_reduce_ints([_NO_LIMIT if own is None else own], op=dist.ReduceOp.MIN)[0]
    return None if limit == _NO_LIMIT else limit


class SavePhases:
    """One save's phases, each closed by an agreement of all ranks on whether any failed (in place of a barrier)."""

    def __init__(self, save_dir: Path, step: int, needed: int):
        self.save_dir, self.step, self.needed = save_dir, step, needed
        self.tmp = layout.tmp_dir(save_dir, step)

    def phase(self, work: Callable[[], Any]) -> Any:
        """Run this rank's ``work``, then agree; on a failure anywhere, clean up and raise on every rank."""
        error, result = None, None
        try:
            result = work()
        except (KeyboardInterrupt, SystemExit):  # the process is going away: no collectives; a resume cleans up
            raise
        except BaseException as e:  # noqa: BLE001 - torch's CheckpointException is a BaseException; _fail raises
            error = e
        code = self._space_errno(error) if error is not None else None
        votes = all_reduce_ints([error is not None] + [code == c for c in space.SPACE_ERRNOS])
        if votes[0]:
            agreed = next((c for c, n in zip(space.SPACE_ERRNOS, votes[1:]) if n), None)
            self._fail(error, agreed, _size_limit(code) if agreed == errno.EFBIG else None)
        return result

    def _space_errno(self, error: BaseException) -> int | None:
        """``layout.space_errno``, which looks at the disk; if that fails too, not a space error (this rank must
        still reach the agreement, or the others would wait for it)."""
        try:
            return space.space_errno(error, self.tmp, needed=self.needed)
        except Exception as e:  # noqa: BLE001
            log.warning("could not tell whether the failed save into %s ran out of space: %s", self.tmp, e)
            return None

    def _fail(self, error: BaseException | None, code: int | None, size_limit: int | None) -> None:
        """Rank 0 removes the partial directory; every rank raises: the same CheckpointSpaceError when any rank
        ran out of room, else its own error (or, where this rank's part went well, a CheckpointError)."""
        message = None
        if _rank() == 0:
            removed = True
            try:
                layout.clear_partial(self.save_dir)
            except OSError as e:
                log.warning("could not remove the partial checkpoint %s: %s", self.tmp, e)
                removed = False
            if code is not None:
                message = space.space_message(code, save_dir=self.save_dir, step=self.step, needed=self.needed,
                                               removed=removed, size_limit=size_limit)
        message = _from_rank0(message)
        if code is not None:
            raise layout.CheckpointSpaceError(message) from error
        if error is not None:
            raise error
        raise layout.CheckpointError(f"saving checkpoint step {self.step} into {self.save_dir} failed on another "
                                     f"rank (its error is in that rank's output); the partial {self.tmp.name} was "
                                     "removed")
