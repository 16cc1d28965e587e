"""The scaling benchmark's CSV: one typed row per measured run, appended under a file lock.

Many Slurm array tasks append to one CSV on a shared filesystem at the same time. Each append takes an exclusive
``fcntl.flock`` on ``<csv>.lock`` (a side file, so the CSV itself can be replaced or read freely), writes the
header if the file is new, checks it otherwise, and writes the whole row with one ``write`` + ``fsync``. Readers
get typed rows back with errors that name the file, the row and the field.

Standard library only: plotting and reading need no torch.
"""

from __future__ import annotations

import csv
import fcntl
import io
import os
from dataclasses import dataclass, fields
from pathlib import Path


@dataclass(frozen=True, slots=True, kw_only=True)
class ScalingRow:
    """One run of ``megatron-vr1 bench scaling`` at one layout."""

    timestamp: str
    """UTC, ISO 8601, when the row was written."""
    git_commit: str
    recipe: str
    model: str
    """The model directory's name (``tiny-demo`` for the CPU preset)."""
    scaling: str
    """"strong" (fixed global batch) or "weak" (fixed batch per process)."""
    nodes: int
    gpus_or_procs: int
    """World size: GPUs on GPU nodes, CPU processes on a CPU machine."""
    tp: int
    pp: int
    dp: int
    global_batch: int
    """Sequences per optimizer step (prompts x G)."""
    seq_len: int
    """Tokens per sequence, image tokens included."""
    steps: int
    step_s_median: float
    step_s_min: float
    tokens_per_s: float
    tokens_per_s_per_device: float
    model_tflops_per_device: float
    """Model FLOPs (policy forward + backward, plus the reference forward when the KL term is on) per second."""
    peak_tflops_per_device: float
    peak_source: str
    """Where the MFU denominator comes from: a GPU datasheet, --peak-tflops, or a CPU matmul measured in-process."""
    mfu: float
    """model_tflops_per_device / peak_tflops_per_device (a fraction)."""
    export_s: float
    """One full weight export (HF-named full tensors gathered over TP/PP, in sync buckets): what each sync pays
    before the push to the rollout servers."""
    export_gb: float
    rollout_s: float | None
    """A rollout-sized generation; None when not measured (see ``note``)."""
    device: str
    note: str


COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(ScalingRow))
_INT = {f.name for f in fields(ScalingRow) if f.type == "int"}
_FLOAT = {f.name for f in fields(ScalingRow) if f.type == "float"}
_OPTIONAL_FLOAT = {f.name for f in fields(ScalingRow) if f.type == "float | None"}


class ScalingCSVError(ValueError):
    """A scaling CSV that cannot be read or appended to; the message names the file, row and fix."""


def _format(row: ScalingRow) -> list[str]:
    out = []
    for name in COLUMNS:
        v = getattr(row, name)
        out.append("" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v))
    return out


def append_row(path: str | Path, row: ScalingRow) -> None:
    """Append ``row`` to the CSV at ``path`` (created with its header if missing), safe against concurrent
    appenders on this host and on a shared filesystem that honours ``flock`` (NFSv4, Lustre with flock)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(_format(row))
    line = buf.getvalue()
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with open(path, "a+", newline="") as f:
                f.seek(0)
                header = f.readline().rstrip("\r\n")
                if not header:
                    line = ",".join(COLUMNS) + "\n" + line
                elif header.split(",") != list(COLUMNS):
                    raise ScalingCSVError(f"{path}: its header is not this version's scaling CSV schema "
                                          f"({len(header.split(','))} columns, expected {len(COLUMNS)}: "
                                          f"{','.join(COLUMNS)}); pass a new --csv file or move the old one away")
                f.seek(0, os.SEEK_END)
                f.write(line)  # one write of the whole row: readers never see half of it
                f.flush()
                os.fsync(f.fileno())
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _parse(path: Path, lineno: int, record: dict[str, str]) -> ScalingRow:
    values: dict = {}
    for name in COLUMNS:
        raw = record.get(name)
        if raw is None:
            raise ScalingCSVError(f"{path} row {lineno}: field {name!r} is missing; the row is truncated, "
                                  "delete it or rerun that layout")
        try:
            if name in _INT:
                values[name] = int(raw)
            elif name in _FLOAT:
                values[name] = float(raw)
            elif name in _OPTIONAL_FLOAT:
                values[name] = float(raw) if raw else None
            else:
                values[name] = raw
        except ValueError:
            raise ScalingCSVError(f"{path} row {lineno}: field {name!r} = {raw!r} is not a number; fix or delete "
                                  "that row") from None
    return ScalingRow(**values)


def read_rows(path: str | Path) -> list[ScalingRow]:
    """All rows of a scaling CSV, in file order."""
    path = Path(path)
    if not path.is_file():
        raise ScalingCSVError(f"{path}: no such CSV; run `megatron-vr1 bench scaling` (or --local-sweep) with "
                              f"--csv {path} first")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            raise ScalingCSVError(f"{path}: the file is empty; run a measurement with --csv {path} first")
        if list(reader.fieldnames) != list(COLUMNS):
            raise ScalingCSVError(f"{path}: its header is not the scaling CSV schema (expected {','.join(COLUMNS)})"
                                  "; was it written by another tool or version?")
        return [_parse(path, i + 2, rec) for i, rec in enumerate(reader)]
