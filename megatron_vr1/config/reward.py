"""RewardConfig: the Vision-R1 criteria and the progressive-refinement schedule (see rewards/)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_vr1.config.base import require


@dataclass(kw_only=True, slots=True)
class RewardConfig:
    preset: Literal["official", "paper"] = "official"
    """"official": the released Vision-R1 code, quirks included; "paper": the paper's text."""

    def __post_init__(self) -> None:
        require(self.preset in ("official", "paper"), "reward.preset", self.preset, "use official or paper")
