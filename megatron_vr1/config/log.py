"""LogConfig: run directory, TensorBoard, progress display, the rollout log."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_vr1.config.base import require


@dataclass(kw_only=True, slots=True)
class LogConfig:
    run_dir: str = "runs/default"
    """Everything a run writes (metrics.jsonl, TensorBoard events, checkpoints, plots) goes here."""
    tensorboard: bool = True
    log_interval: int = 1
    progress: bool = True
    """A rich progress bar with an ETA on rank 0."""
    rollouts: bool = False
    """Also write every sampled group to RUN_DIR/rollouts.jsonl (step, sample id, and per completion its id, text,
    finish reason, weight version and reward): to audit what the policy generated, and that no sample was lost or
    repeated. Off by default: a 7B recipe's step writes about 1 MB."""

    def __post_init__(self) -> None:
        require(bool(self.run_dir), "log.run_dir", self.run_dir, "give a directory for the run's outputs")
        require(self.log_interval >= 1, "log.log_interval", self.log_interval, "use >= 1")
