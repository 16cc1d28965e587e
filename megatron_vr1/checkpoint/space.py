"""Why a checkpoint save failed for lack of room, and what to tell the user (filesystem only: no torch).

A full filesystem, a quota and a file-size limit (``ulimit -f``) fail a save the same way, and more room fixes
each. megatron's writer drops the cause (its error keeps only the class name, ``Worker failure: ... error: <class
'OSError'>``) and torch's zip writer reports a full disk as ``unexpected pos ...``, so ``space_errno`` looks at
the failure chain first and then asks the filesystem. ``space_message`` names the directory, the sizes, what was
left behind and what to do.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from megatron_vr1.checkpoint.layout import LATEST, list_checkpoints, tmp_dir, tree_bytes

SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
"""The write failures that more room fixes: a full filesystem, a quota, a file-size limit (``ulimit -f``)."""


def human_bytes(n: int) -> str:
    """``26.1 MB``-style sizes (decimal units, as ``df -H`` prints them) for messages."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def free_bytes(path: str | Path) -> int:
    """Bytes an unprivileged process can still write on the filesystem holding ``path`` (or its nearest existing
    parent: the save dir itself may not exist yet)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _failure_chain(error: BaseException) -> Iterator[BaseException]:
    """``error``, its causes and contexts, and for torch's CheckpointException each rank's wrapped failure
    (``.failures``: {rank: (exception, traceback)}), which is where megatron's writer errors end up."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]


def file_size_limit() -> int | None:
    """This process's RLIMIT_FSIZE soft limit in bytes (``ulimit -f``), None when unlimited."""
    try:
        import resource
    except ImportError:  # not POSIX
        return None
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def _reached_size_limit(partial: Path) -> bool:
    limit = file_size_limit()
    if limit is None:
        return False
    for dirpath, _dirnames, filenames in os.walk(partial):
        for name in filenames:
            try:
                if os.lstat(os.path.join(dirpath, name)).st_size >= limit:
                    return True
            except FileNotFoundError:
                pass
    return False


def space_errno(error: BaseException, partial: str | Path, *, needed: int) -> int | None:
    """ENOSPC, EDQUOT or EFBIG when the save into ``partial`` failed for lack of room, else None. Call before
    removing ``partial``. ``needed``: the estimated size of the whole checkpoint (all ranks).

    The errno is taken from the failure chain when it is there. megatron's writer drops it: its error keeps only
    the class name ("Worker failure: An error is caught while starting worker 0, error: <class 'OSError'>"), and
    torch's zip writer reports a full disk as "unexpected pos ...". So when the chain names no errno, the
    filesystem is asked: a file stopped at the ``ulimit -f`` size means EFBIG; less room left than the rest of
    the checkpoint needs (with 1% + 1 MiB of slack for the files' overhead, ``needed`` counts tensors only)
    means ENOSPC: the save could not have finished, whatever else went wrong."""
    for e in _failure_chain(error):
        if isinstance(e, OSError) and e.errno in SPACE_ERRNOS:
            return e.errno
        text = str(e)
        for code in SPACE_ERRNOS:
            if os.strerror(code) in text:
                return code
    partial = Path(partial)
    if _reached_size_limit(partial):
        return errno.EFBIG
    remaining = max(needed - tree_bytes(partial), 0)
    if free_bytes(partial.parent) < remaining + needed // 100 + (1 << 20):
        return errno.ENOSPC
    return None


def _space_reason_and_advice(code: int, save_dir: Path, limit: int | None) -> tuple[str, str]:
    """Why a save with ``code`` (``SPACE_ERRNOS``) failed, and what makes the next one fit."""
    if code == errno.EFBIG and limit is not None:
        return (f"a file reached this process's file-size limit (ulimit -f: {human_bytes(limit)})",
                "Raise the limit (`ulimit -f unlimited` in the job script) and resume")
    if code == errno.EFBIG:
        return ("a file grew past the largest file this filesystem allows",
                "Point checkpoint.save_dir at another filesystem and resume")
    kept = list_checkpoints(save_dir)
    advice = "Free space there or point checkpoint.save_dir at a larger filesystem"
    if len(kept) > 1:  # with one left, a lower keep_last frees nothing
        advice = (f"Free space there, point checkpoint.save_dir at a larger filesystem, or lower checkpoint.keep_last "
                  f"({len(kept)} complete checkpoints there use {human_bytes(sum(map(tree_bytes, kept)))}, and a "
                  "save needs room for one more before the oldest is removed)")
    return "the disk quota is exceeded" if code == errno.EDQUOT else "the filesystem is full", advice + ", then resume"


def space_message(code: int, *, save_dir: str | Path, step: int, needed: int, removed: bool,
                  size_limit: int | None = None) -> str:
    """What a save that failed with ``code`` (``SPACE_ERRNOS``) tells the user: the directory, the sizes, the state
    left behind and what to do. Call after the partial directory was removed (``removed``: whether that worked),
    so that the free space shown is what the next save will find. ``needed`` counts tensor bytes only, so the
    size of the newest checkpoint is shown beside it when there is one. ``size_limit``: for EFBIG, the
    ``file_size_limit()`` of the rank that hit it (None: the filesystem's own maximum)."""
    save_dir = Path(save_dir)
    reason, advice = _space_reason_and_advice(code, save_dir, size_limit)
    pointer = save_dir / LATEST
    latest = pointer.read_text().strip() if pointer.is_file() else None
    sizes = f"The checkpoint needs about {human_bytes(needed)} (the tensors it saves"
    if latest is not None and (save_dir / latest).is_dir():
        sizes += f"; {latest} takes {human_bytes(tree_bytes(save_dir / latest))}"
    sizes += f") and {human_bytes(free_bytes(save_dir))} are free there"
    if code == errno.EDQUOT:
        sizes += " (your quota may allow less)"
    partial = tmp_dir(save_dir, step).name
    left = f"The partial {partial} was removed" if removed else f"The partial {partial} could not be removed: delete it"
    left += f" and `latest` still names {latest}" if latest else "; there is no complete checkpoint yet"
    return f"saving checkpoint step {step} into {save_dir} failed: {reason}. {sizes}. {left}. {advice}."
