"""megatron-vr1: Vision-R1 (criterion-driven GRPO for localization) on Megatron-Core.

Importing the package is cheap: nothing here imports torch, megatron or sglang. Subpackages:
config, types, rewards, algorithms, data, eval (CPU-pure); parallel, models, convert, checkpoint,
rollout, weight_sync, training (torch / megatron-core); cli.
"""

__version__ = "0.1.0"
