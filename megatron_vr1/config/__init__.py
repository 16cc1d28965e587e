"""Configuration: one dataclass per concern plus the RunConfig root; recipes and overrides."""

from megatron_vr1.config.base import ConfigError, apply_override, from_dict, require, to_dict
from megatron_vr1.config.checkpoint import CheckpointConfig
from megatron_vr1.config.data import DataConfig
from megatron_vr1.config.grpo import GRPOConfig
from megatron_vr1.config.log import LogConfig
from megatron_vr1.config.model import ModelConfig
from megatron_vr1.config.parallel import ParallelConfig
from megatron_vr1.config.recipes import available_recipes, load_recipe, recipe
from megatron_vr1.config.reward import RewardConfig
from megatron_vr1.config.rollout import RolloutConfig
from megatron_vr1.config.run import RunConfig

__all__ = [
    "CheckpointConfig", "ConfigError", "DataConfig", "GRPOConfig", "LogConfig", "ModelConfig", "ParallelConfig",
    "RewardConfig", "RolloutConfig", "RunConfig", "apply_override", "available_recipes", "from_dict",
    "load_recipe", "recipe", "require", "to_dict",
]
