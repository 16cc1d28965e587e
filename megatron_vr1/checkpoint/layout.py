"""Checkpoint directory layout and atomic publication (filesystem only: no torch, no megatron).

    <save_dir>/
        latest                 text: the name of the newest complete checkpoint ("iter_0000120")
        iter_0000120/          a complete checkpoint (contains MARKER, written last)
        .tmp-iter_0000140/     a save in progress, or one interrupted by a crash: never loaded

A save writes everything into ``.tmp-iter_XXXXXXX``, fsyncs it, renames it to ``iter_XXXXXXX`` and only then
replaces ``latest`` (write a temp file + os.replace). A crash at any point leaves ``latest`` naming the
previous complete checkpoint.

A save that fails for lack of space (a full disk, a quota, a file-size limit) is reported as
``CheckpointSpaceError`` with the sizes involved and what to do; its partial directory is removed, since a
requeued job would otherwise find the space still taken and fail again (``space_errno``, ``space_message``).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

LATEST = "latest"
MARKER = "train_state.json"
"""Written last into a checkpoint directory: its presence means every rank finished writing."""
TMP_PREFIX = ".tmp-"
_ITER_RE = re.compile(r"^iter_(\d{7,})$")
_PARTIAL_RE = re.compile(rf"^{re.escape(TMP_PREFIX)}(replaced-)?iter_\d{{7,}}$")
"""``.tmp-iter_X``: a save that did not finish; ``.tmp-replaced-iter_X``: the old copy of a re-saved step."""
SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
"""The write failures that more room fixes: a full filesystem, a quota, a file-size limit (``ulimit -f``)."""

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be loaded or saved; the message names the path and what to do."""


class CheckpointSpaceError(CheckpointError):
    """A save failed for lack of room (``SPACE_ERRNOS``). Its partial directory is gone and ``latest`` still names
    the last complete checkpoint, so making room and resuming recovers."""


def iter_name(step: int) -> str:
    if step < 0:
        raise CheckpointError(f"step={step} is invalid: checkpoints are numbered by optimizer step (>= 0)")
    return f"iter_{step:07d}"


def tmp_dir(save_dir: str | Path, step: int) -> Path:
    return Path(save_dir) / f"{TMP_PREFIX}{iter_name(step)}"


def is_checkpoint_name(name: str) -> bool:
    """``iter_XXXXXXX`` or its partial ``.tmp-`` form: a checkpoint directory, not a save dir."""
    return bool(_ITER_RE.match(name) or name.startswith(TMP_PREFIX))


def step_of(path: str | Path) -> int:
    match = _ITER_RE.match(Path(path).name)
    if not match:
        raise CheckpointError(f"{path}: not a checkpoint directory name (expected iter_XXXXXXX)")
    return int(match.group(1))


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file, then every directory (bottom up), so a rename cannot publish unwritten data."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def _stage_text(path: Path, text: str) -> Path:
    """``text`` written and fsynced into a temp file beside ``path``, for an os.replace onto it. Removed again if
    the write fails (a full disk), so a failed write leaves nothing behind."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file + fsync + os.replace: readers see the old or the new file."""
    os.replace(_stage_text(path, text), path)
    _fsync_path(path.parent)


def _rename_into_place(src: Path, dst: Path) -> Path | None:
    """Rename ``src`` to ``dst``; an existing ``dst`` (a re-saved step) is first moved aside, to the returned path."""
    replaced = None
    if dst.exists():  # re-saving a step (a rerun from an earlier checkpoint): move the old copy aside first
        replaced = dst.with_name(f"{TMP_PREFIX}replaced-{dst.name}")
        if replaced.exists():
            shutil.rmtree(replaced)
        os.rename(dst, replaced)
    os.rename(src, dst)
    _fsync_path(dst.parent)
    return replaced


def publish(save_dir: str | Path, step: int) -> Path:
    """Turn the finished ``.tmp-iter_XXXXXXX`` into ``iter_XXXXXXX`` and point ``latest`` at it (one process)."""
    save_dir = Path(save_dir)
    src, dst = tmp_dir(save_dir, step), save_dir / iter_name(step)
    if not (src / MARKER).is_file():
        raise CheckpointError(f"{src}: cannot publish, {MARKER} is missing (the save did not finish)")
    fsync_tree(src)
    # The new pointer is written before anything is renamed: what is left after it needs no space, so a full
    # disk fails the save here, with nothing published and ``src`` still a partial directory to remove.
    pointer = _stage_text(save_dir / LATEST, dst.name + "\n")
    try:
        replaced = _rename_into_place(src, dst)
        os.replace(pointer, save_dir / LATEST)
    finally:
        pointer.unlink(missing_ok=True)
    _fsync_path(save_dir)
    if replaced is not None:
        shutil.rmtree(replaced)
    return dst


def validate(path: str | Path) -> Path:
    """``path`` if it is a complete checkpoint directory, else a CheckpointError saying what is wrong."""
    path = Path(path)
    if path.name.startswith(TMP_PREFIX):
        raise CheckpointError(f"{path} is a half-written checkpoint (a save was interrupted): load a complete "
                              f"iter_XXXXXXX directory or the save dir's `{LATEST}` instead, and delete this one")
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    step_of(path)
    if not (path / MARKER).is_file():
        raise CheckpointError(f"{path} is incomplete ({MARKER} missing: the save was interrupted or files were "
                              f"removed). Point {path.parent / LATEST} at an earlier iter_ directory or delete it")
    return path


def resolve(load_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: ``load_dir`` itself if it is an ``iter_`` directory, else the one named by
    ``<load_dir>/latest``; None when ``load_dir`` holds no ``latest`` (a fresh run). Never guesses past a
    missing or broken ``latest``: a bad pointer is an error, not a silent restart from scratch."""
    load_dir = Path(load_dir)
    if is_checkpoint_name(load_dir.name):
        return validate(load_dir)
    pointer = load_dir / LATEST
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    if not _ITER_RE.match(name):
        raise CheckpointError(f"{pointer}: expected a checkpoint name like iter_0000100, found {name[:80]!r}; "
                              "fix or delete the file")
    return validate(load_dir / name)


def list_checkpoints(save_dir: str | Path) -> list[Path]:
    """Complete-looking ``iter_`` directories, oldest first."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    found = [p for p in save_dir.iterdir() if p.is_dir() and _ITER_RE.match(p.name)]
    return sorted(found, key=step_of)


def tree_bytes(path: str | Path) -> int:
    """Bytes the files under ``path`` occupy on disk (allocated blocks, what removing them frees); 0 if absent."""
    total = 0
    for dirpath, _dirnames, filenames in os.walk(path):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def clear_partial(save_dir: str | Path) -> dict[Path, int]:
    """Remove what unfinished saves left in ``save_dir``: ``.tmp-iter_X`` (a save that crashed or ran out of space)
    and ``.tmp-replaced-iter_X`` (the old copy of a re-saved step, set aside by ``publish``). Returns {path: bytes
    freed}. Never removes an ``iter_`` directory or ``latest``. One process, with no save into ``save_dir``
    running: before a save, after a publish or a failed save, before a resume (a requeued job would otherwise
    find the space still taken).

    A ``.tmp-replaced-iter_X`` without its ``iter_X`` is the only copy of that checkpoint (the re-save stopped
    between its two renames): it is renamed back, not removed."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return {}
    removed = {}
    for path in sorted(save_dir.iterdir()):
        match = _PARTIAL_RE.match(path.name)
        if not match or not path.is_dir() or path.is_symlink():
            continue
        original = save_dir / path.name.removeprefix(f"{TMP_PREFIX}replaced-")
        if match.group(1) and not original.exists():
            os.rename(path, original)
            log.warning("restored %s from %s (a re-save of that step was interrupted)", original, path.name)
            continue
        removed[path] = tree_bytes(path)
        shutil.rmtree(path)
    return removed


def prune(save_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints (never the one ``latest`` names) and leftover
    directories of interrupted saves (``clear_partial``). Returns what was removed. Call on one process, after
    publish."""
    if keep_last < 1:
        raise CheckpointError(f"keep_last={keep_last} is invalid: keep at least 1 checkpoint")
    save_dir = Path(save_dir)
    pointer = save_dir / LATEST
    current = pointer.read_text().strip() if pointer.exists() else None
    removed = []
    for path in list_checkpoints(save_dir)[:-keep_last]:
        if path.name != current:
            shutil.rmtree(path)
            removed.append(path)
    return removed + list(clear_partial(save_dir))


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
