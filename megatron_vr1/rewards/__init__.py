"""Vision-R1 criterion-driven reward: parsing, batched matching, criteria and progressive refinement.

Pure numpy + scipy: importing this package never imports torch, megatron or sglang (a unit test checks).
Entry points: ``score_batch`` (the trainer), ``RewardTarget`` builders, ``RefinementSchedule``
(checkpointed), ``RewardWorker`` (score in another process while generation runs).
"""

from megatron_vr1.rewards.schedule import RefinementSchedule, Stage
from megatron_vr1.rewards.score import score_batch
from megatron_vr1.rewards.target import (RewardInputError, RewardTarget, make_target, target_from_row,
                                         target_from_sample)
from megatron_vr1.rewards.worker import RewardWorker

__all__ = ["RefinementSchedule", "RewardInputError", "RewardTarget", "RewardWorker", "Stage", "make_target",
           "score_batch", "target_from_row", "target_from_sample"]
