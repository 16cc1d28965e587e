"""CheckpointConfig: where and how often the full training state is saved."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_vr1.config.base import require


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    save_dir: str = ""
    """Defaults to <log.run_dir>/checkpoints when empty."""
    save_interval: int = 200
    """Save every this many steps, at the last step and when the time budget runs out. 0: never save (benchmarks
    and acceptance runs; such a run cannot be resumed)."""
    keep_last: int = 3
    resume: bool = True
    """Continue from <save_dir>/latest when it exists."""
    init_from: str = ""
    """Warm start: load model weights (not optimizer/schedule/RNG) from this checkpoint dir when the run has no
    checkpoint of its own yet, e.g. the SFT run's <run_dir>/checkpoints. It also becomes the KL reference."""

    def __post_init__(self) -> None:
        require(self.save_interval >= 0, "checkpoint.save_interval", self.save_interval,
                "use >= 1, or 0 to never save")
        require(self.keep_last >= 1, "checkpoint.keep_last", self.keep_last, "keep at least 1 checkpoint")
