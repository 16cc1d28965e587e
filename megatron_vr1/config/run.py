"""RunConfig: the root of a run's configuration, one section per concern."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from megatron_vr1.config.base import from_dict, require, to_dict
from megatron_vr1.config.checkpoint import CheckpointConfig
from megatron_vr1.config.data import DataConfig
from megatron_vr1.config.grpo import GRPOConfig
from megatron_vr1.config.log import LogConfig
from megatron_vr1.config.model import ModelConfig
from megatron_vr1.config.parallel import ParallelConfig
from megatron_vr1.config.reward import RewardConfig
from megatron_vr1.config.rollout import RolloutConfig


@dataclass(kw_only=True, slots=True)
class RunConfig:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        # Cross-section checks; each section validates itself.
        require(not self.parallel.sequence_parallel or self.model.transformer_impl != "local"
                or self.parallel.tensor_parallel > 1, "parallel.sequence_parallel", self.parallel.sequence_parallel,
                "sequence parallelism needs tensor_parallel > 1")
        if self.grpo.mode == "grpo":
            require(self.rollout.temperature > 0, "rollout.temperature", self.rollout.temperature,
                    "GRPO samples its group; use a temperature > 0 (released recipe: 1.0)")

    def to_dict(self) -> dict:
        return to_dict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        return from_dict(cls, data)
