"""Checkpoint directory layout and atomic publication (filesystem only: no torch, no megatron).

    <save_dir>/
        latest                 text: the name of the newest complete checkpoint ("iter_0000120")
        iter_0000120/          a complete checkpoint (contains MARKER, written last)
        .tmp-iter_0000140/     a save in progress, or one interrupted by a crash: never loaded

A save writes everything into ``.tmp-iter_XXXXXXX``, fsyncs it, renames it to ``iter_XXXXXXX`` and only then
replaces ``latest`` (write a temp file + os.replace). A crash at any point leaves ``latest`` naming the
previous complete checkpoint.

A save that fails for lack of space (a full disk, a quota, a file-size limit) is reported as
``CheckpointSpaceError`` with the sizes involved and what to do (``checkpoint/space.py``); its partial directory
is removed (``clear_partial``), since a requeued job would otherwise find the space still taken and fail again.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

LATEST = "latest"
MARKER = "train_state.json"
"""Written last into a checkpoint directory: its presence means every rank finished writing."""
TMP_PREFIX = ".tmp-"
_ITER_RE = re.compile(r"^iter_(\d{7,})$")
_PARTIAL_RE = re.compile(rf"^{re.escape(TMP_PREFIX)}(replaced-)?iter_\d{{7,}}$")
"""``.tmp-iter_X``: a save that did not finish; ``.tmp-replaced-iter_X``: the old copy of a re-saved step."""

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
