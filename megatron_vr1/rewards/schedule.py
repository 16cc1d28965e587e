"""Progressive rule refinement (spec vision-r1.md §2): which thresholds apply at a training step.

Two stages, beginner then advanced, switched at an optimizer step (released code: 1500) or at a fraction of
the run (paper: STEP = 1/2). ``step=None`` means "no step known": the released code then does no
differentiation at all ("plain"), the paper preset uses the beginner stage.

The schedule is saved in training checkpoints (``state_dict``) so that a resumed run keeps the switch
point it started with even if ``train_steps`` changed, and logs when the switch happened.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_vr1.config.reward import RewardConfig, RewardRules, StageThresholds


@dataclass(frozen=True, slots=True)
class Stage:
    """A named stage and its thresholds."""

    name: str
    """"plain", "beginner" or "advanced"."""
    thresholds: StageThresholds


class RefinementSchedule:
    """Maps a training step to the refinement stage; stateful only for checkpointing and logging."""

    def __init__(self, rules: RewardRules, total_steps: int | None = None) -> None:
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"total_steps={total_steps} is invalid: use the number of optimizer steps (>= 1)")
        self._rules = rules
        self.unit = rules.schedule_unit
        self.total_steps = total_steps
        self.switch_at = self._switch_step(rules, total_steps)
        self.last_step: int | None = None
        self.switched_at: int | None = None

    @classmethod
    def from_config(cls, cfg: RewardConfig, total_steps: int | None = None) -> "RefinementSchedule":
        """Build the schedule of ``cfg`` for a run of ``total_steps`` optimizer steps."""
        return cls(cfg.rules(), total_steps)

    @staticmethod
    def _switch_step(rules: RewardRules, total_steps: int | None) -> int | None:
        if rules.schedule_unit == "step":
            return rules.switch_step
        if total_steps is None:
            return None  # only step=None can be scored until the run length is known
        # STEP = 1 must mean "never switch": the first advanced step would be total_steps itself.
        return int(round(rules.switch_fraction * total_steps))

    def stage_at(self, step: int | None) -> Stage:
        """The stage for ``step`` (pure: does not record anything)."""
        if step is None:
            if self._rules.without_step == "plain":
                return Stage("plain", self._rules.plain)
            return Stage("beginner", self._rules.beginner)
        if self.switch_at is None:
            raise ValueError("reward.schedule_unit='fraction' needs the run length to place the switch: build the "
                             "schedule with RefinementSchedule.from_config(cfg, total_steps=grpo.train_steps) "
                             "and pass it as schedule=, or set reward.schedule_unit=step")
        if step < self.switch_at:
            return Stage("beginner", self._rules.beginner)
        return Stage("advanced", self._rules.advanced)

    def observe(self, step: int) -> Stage:
        """Record that training reached ``step``; returns its stage (the trainer calls this once per step)."""
        stage = self.stage_at(step)
        if stage.name == "advanced" and self.switched_at is None:
            self.switched_at = step
        self.last_step = step
        return stage

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able state for the training checkpoint."""
        return {"unit": self.unit, "total_steps": self.total_steps, "switch_at": self.switch_at,
                "last_step": self.last_step, "switched_at": self.switched_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpointed schedule: the checkpoint's switch point wins over the current config."""
        missing = {"unit", "total_steps", "switch_at", "last_step", "switched_at"} - set(state)
        if missing:
            raise ValueError(f"refinement schedule state is missing {sorted(missing)}; "
                             "was it written by RefinementSchedule.state_dict()?")
        if state["switch_at"] is not None and (not isinstance(state["switch_at"], int) or state["switch_at"] < 0):
            raise ValueError(f"refinement schedule state: switch_at={state['switch_at']!r} must be an int >= 0")
        self.unit = state["unit"]
        self.total_steps = state["total_steps"]
        self.switch_at = state["switch_at"]
        self.last_step = state["last_step"]
        self.switched_at = state["switched_at"]
