"""Checkpoint directory layout and atomic publication (filesystem only: no torch, no megatron).

    <save_dir>/
        latest                 text: the name of the newest complete checkpoint ("iter_0000120")
        iter_0000120/          a complete checkpoint (contains MARKER, written last)
        .tmp-iter_0000140/     a save in progress, or one interrupted by a crash: never loaded

A save writes everything into ``.tmp-iter_XXXXXXX``, fsyncs it, renames it to ``iter_XXXXXXX`` and only then
replaces ``latest`` (write a temp file + os.replace). A crash at any point leaves ``latest`` naming the
previous complete checkpoint.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

LATEST = "latest"
MARKER = "train_state.json"
"""Written last into a checkpoint directory: its presence means every rank finished writing."""
TMP_PREFIX = ".tmp-"
_ITER_RE = re.compile(r"^iter_(\d{7,})$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be loaded or saved; the message names the path and what to do."""


def iter_name(step: int) -> str:
    if step < 0:
        raise CheckpointError(f"step={step} is invalid: checkpoints are numbered by optimizer step (>= 0)")
    return f"iter_{step:07d}"


def tmp_dir(save_dir: str | Path, step: int) -> Path:
    return Path(save_dir) / f"{TMP_PREFIX}{iter_name(step)}"


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


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file + fsync + os.replace: readers see the old or the new file."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def publish(save_dir: str | Path, step: int) -> Path:
    """Turn the finished ``.tmp-iter_XXXXXXX`` into ``iter_XXXXXXX`` and point ``latest`` at it (one process)."""
    save_dir = Path(save_dir)
    src, dst = tmp_dir(save_dir, step), save_dir / iter_name(step)
    if not (src / MARKER).is_file():
        raise CheckpointError(f"{src}: cannot publish, {MARKER} is missing (the save did not finish)")
    fsync_tree(src)
    replaced = None
    if dst.exists():  # re-saving a step (a rerun from an earlier checkpoint): move the old copy aside first
        replaced = save_dir / f"{TMP_PREFIX}replaced-{dst.name}"
        if replaced.exists():
            shutil.rmtree(replaced)
        os.rename(dst, replaced)
    os.rename(src, dst)
    _fsync_path(save_dir)
    write_text_atomic(save_dir / LATEST, dst.name + "\n")
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
    if _ITER_RE.match(load_dir.name) or load_dir.name.startswith(TMP_PREFIX):
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


def prune(save_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints (never the one ``latest`` names) and leftover
    ``.tmp-`` directories of interrupted saves. Returns what was removed. Call on one process, after publish."""
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
    for path in save_dir.iterdir():
        if path.name.startswith(TMP_PREFIX) and path.is_dir():
            shutil.rmtree(path)
            removed.append(path)
    return removed
