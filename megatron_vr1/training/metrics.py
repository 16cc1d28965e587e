"""Run logging on rank 0: one JSON line per step (metrics.jsonl), TensorBoard scalars, a rich progress bar with
an ETA. Other ranks get a logger that does nothing, so the loop never branches on the rank."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    """``log(step, scalars)`` appends ``{"step": step, "time": t, **scalars}`` to RUN_DIR/metrics.jsonl and writes
    every finite scalar to TensorBoard under its name ("reward/total", "train/kl", ...)."""

    def __init__(self, run_dir: str | Path, *, total_steps: int, start_step: int = 0, tensorboard: bool = True,
                 progress: bool = True, enabled: bool = True, description: str = "train") -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._writer = self._progress = self._task = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if start_step == 0:
            _set_aside_earlier_run(self.run_dir)
        self._file = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))
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

    def close(self) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.stop()
        if self._writer is not None:
            self._writer.close()
        self._file.close()


def _set_aside_earlier_run(run_dir: Path) -> None:
    """A run starting at step 0 in a directory that holds an earlier run's logs (``--no-resume``, or a resume that
    found no checkpoint) renames them to ``metrics.prevN.jsonl`` / ``tensorboard.prevN``: appending would mix two
    runs in one curve (and in ``read_metrics``), deleting would lose them."""
    metrics, board = run_dir / METRICS_FILE, run_dir / "tensorboard"
    old_metrics = metrics.is_file() and metrics.stat().st_size > 0
    old_board = board.is_dir() and any(board.iterdir())
    if not (old_metrics or old_board):
        return
    n = 1
    while (run_dir / f"metrics.prev{n}.jsonl").exists() or (run_dir / f"tensorboard.prev{n}").exists():
        n += 1
    if old_metrics:
        metrics.rename(run_dir / f"metrics.prev{n}.jsonl")
    if old_board:
        board.rename(run_dir / f"tensorboard.prev{n}")
    print(f"{run_dir}: a new run from step 0; the earlier run's logs are kept as metrics.prev{n}.jsonl / "
          f"tensorboard.prev{n}", flush=True)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl; a resumed run's repeated steps keep their last record. Raises
    naming the file and line when a line is not JSON."""
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
