"""Process groups, the torchrun / Slurm environment, device selection, and the CPU compatibility layer for
megatron-core. The only package that sets up torch.distributed.

``parallel.env`` is pure standard library; ``parallel.state`` imports torch and megatron-core lazily.
"""

from megatron_vr1.parallel.env import DistEnv, detect, expand_nodelist, free_port

__all__ = ["DistEnv", "detect", "expand_nodelist", "free_port"]
