"""Run logging on rank 0: one JSON line per step (metrics.jsonl), TensorBoard scalars, a rich progress bar with
an ETA. Other ranks get a logger that does nothing, so the loop never branches on the rank.

One history per run directory: a run from step 0 sets an earlier run's logs aside (``metrics.prevN.jsonl`` /
``tensorboard.prevN``); a run resumed from the checkpoint of step S sets aside the records of steps after S, which
the killed run logged but the resumed run redoes (``metrics.rewoundN.jsonl``; TensorBoard hides them itself through
``purge_step``). Otherwise metrics.jsonl and the curves would hold those steps twice, with different values."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
ROLLOUTS_FILE = "rollouts.jsonl"
"""With ``log.rollouts``: one line per sampled group, ``{"step", "sample_id", "completions": [...]}``."""


class MetricsLogger:
    """``log(step, scalars)`` appends ``{"step": step, "time": t, **scalars}`` to RUN_DIR/metrics.jsonl and writes
    every finite scalar to TensorBoard under its name ("reward/total", "train/kl", ...). With ``rollouts``,
    ``log_rollouts`` appends the step's sampled groups to RUN_DIR/rollouts.jsonl."""

    def __init__(self, run_dir: str | Path, *, total_steps: int, start_step: int = 0, tensorboard: bool = True,
                 progress: bool = True, enabled: bool = True, description: str = "train",
                 rollouts: bool = False) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._writer = self._progress = self._task = self._rollouts = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if start_step == 0:
            _set_aside_earlier_run(self.run_dir)
        else:
            _set_aside_steps_after(self.run_dir, start_step, METRICS_FILE)
            _set_aside_steps_after(self.run_dir, start_step, ROLLOUTS_FILE, one_per_step=False)
        self._file = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")
        if rollouts:
            self._rollouts = open(self.run_dir / ROLLOUTS_FILE, "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard drops the events of steps >= start_step + 1 written before this restart.
            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"),
                                         purge_step=start_step + 1 if start_step > 0 else None)
        if progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            from rich.progress import TimeRemainingColumn

            self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                      TextColumn("{task.fields[status]}"))
            self._progress.start()
            self._task = self._progress.add_task(description, total=total_steps, completed=start_step, status="")

    def log(self, step: int, scalars: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **scalars}
        self._file.write(json.dumps(record, default=float) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in scalars.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._writer.add_scalar(key, value, step)
            self._writer.flush()
        if self._progress is not None:
            status = " ".join(f"{k.split('/')[-1]}={scalars[k]:.3g}" for k in ("reward/total", "train/loss")
                              if isinstance(scalars.get(k), (int, float)))
            self._progress.update(self._task, completed=step, status=status)

    def log_rollouts(self, step: int, groups, rewards) -> None:
        """One line per group (``types.RolloutGroup``; ``rewards``: their RewardBreakdowns, group after group)."""
        if self._rollouts is None:
            return
        scores = iter(rewards)
        for group in groups:
            completions = [{"id": c.request_id, "weight_version": c.weight_version, "finish_reason": c.finish_reason,
                            "reward": next(scores).total, "text": c.text} for c in group.completions]
            self._rollouts.write(json.dumps({"step": step, "sample_id": group.sample.sample_id,
                                             "completions": completions}) + "\n")
        self._rollouts.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._rollouts is not None:
            self._rollouts.close()
        if self._progress is not None:
            self._progress.stop()
        if self._writer is not None:
            self._writer.close()
        self._file.close()


def _set_aside_earlier_run(run_dir: Path) -> None:
    """A run starting at step 0 in a directory that holds an earlier run's logs (``--no-resume``, or a resume that
    found no checkpoint) renames them to ``metrics.prevN.jsonl`` / ``rollouts.prevN.jsonl`` / ``tensorboard.prevN``:
    appending would mix two runs in one curve (and in ``read_metrics``), deleting would lose them."""
    olds = [p for p in (run_dir / METRICS_FILE, run_dir / ROLLOUTS_FILE) if p.is_file() and p.stat().st_size > 0]
    board = run_dir / "tensorboard"
    if board.is_dir() and any(board.iterdir()):
        olds.append(board)
    if not olds:
        return
    n = 1
    while any(_numbered(p, "prev", n).exists() for p in (run_dir / METRICS_FILE, run_dir / ROLLOUTS_FILE, board)):
        n += 1
    for p in olds:
        p.rename(_numbered(p, "prev", n))
    print(f"{run_dir}: a new run from step 0; the earlier run's logs are kept as "
          + " / ".join(_numbered(p, "prev", n).name for p in olds), flush=True)


def _numbered(path: Path, kind: str, n: int) -> Path:
    """metrics.jsonl -> metrics.{kind}{n}.jsonl; tensorboard -> tensorboard.{kind}{n}."""
    stem, dot, ext = path.name.partition(".")
    return path.with_name(f"{stem}.{kind}{n}{dot}{ext}")


def _set_aside_steps_after(run_dir: Path, start_step: int, name: str, *, one_per_step: bool = True) -> None:
    """A run resuming from the checkpoint of ``start_step`` moves the records of later steps (logged by the run
    that was killed before its next checkpoint, redone now), any line that is not a record (a write torn by the
    kill) and, in a file of ``one_per_step`` records, any earlier duplicate of a step, from RUN_DIR/``name`` to
    ``<stem>.rewoundN.jsonl``, keeping the records up to ``start_step``. The rewound file is written first and
    ``name`` replaced atomically, so a crash here loses no line."""
    path = run_dir / name
    if not path.is_file():
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    steps = [_step_of(line) for line in lines]
    last = {s: i for i, s in enumerate(steps) if s is not None}  # a step's last record is the current one
    stays = [s is not None and s <= start_step and (last[s] == i or not one_per_step) for i, s in enumerate(steps)]
    aside = [line for line, ok in zip(lines, stays) if not ok]
    if not aside:
        return
    n = 1
    while _numbered(path, "rewound", n).exists():
        n += 1
    rewound = _numbered(path, "rewound", n)
    _write_atomic(rewound, aside)
    _write_atomic(path, [line for line, ok in zip(lines, stays) if ok])
    moved = sorted({s for s, ok in zip(steps, stays) if not ok and s is not None})
    what = f"steps {moved[0]}..{moved[-1]}" if moved else "no step"
    print(f"{run_dir}: resuming after the checkpoint of step {start_step}; moved {len(aside)} line(s) of {name}"
          f" ({what}: logged after that checkpoint, repeated, or torn by the kill) to {rewound.name}", flush=True)


def _step_of(line: str) -> int | None:
    """The record's step, or None for a line that is not a metrics record."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _write_atomic(path: Path, lines: list[str]) -> None:
    """Write ``lines`` to a temp file beside ``path``, fsync it, then rename it over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl, one per step. The file holds each step once (a resume sets later
    steps aside); a repeated step (a log written before that rule) keeps its last record. Raises naming the file
    and line when a line is not JSON."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass the run directory of a `megatron-vr1 train` run")
    by_step: dict[int, dict] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            by_step[int(rec["step"])] = rec
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} line {n}: not a metrics record ({e}); delete the line or the file") from None
    return [by_step[s] for s in sorted(by_step)]
