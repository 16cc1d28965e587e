"""ParallelConfig: the TP / PP / DP layout and the distributed backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_vr1.config.base import require


@dataclass(kw_only=True, slots=True)
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    sequence_parallel: bool = False
    """Shard activations along the sequence in norms/dropout (needs tensor_parallel > 1)."""
    micro_batch_size: int = 1
    """Sequences per micro-batch on each data-parallel rank (with pack_groups: completions, in whole groups)."""
    pack_groups: bool = False
    """Shared-prompt packing: each GRPO group's completions train behind one copy of their prompt and image, so
    the vision tower and the prompt run once per group instead of G times (exact; training/packing.py). Needs
    the local layer spec (model.transformer_impl=local): it uses an arbitrary attention mask."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """"auto": nccl when CUDA is available, gloo otherwise."""
    seed: int = 1234

    def __post_init__(self) -> None:
        for name in ("tensor_parallel", "pipeline_parallel", "micro_batch_size"):
            v = getattr(self, name)
            require(isinstance(v, int) and v >= 1, f"parallel.{name}", v, "use an integer >= 1")
        require(not self.sequence_parallel or self.tensor_parallel > 1, "parallel.sequence_parallel",
                self.sequence_parallel, "sequence parallelism splits over the TP group; set tensor_parallel > 1 "
                "or sequence_parallel=false")

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel

    def data_parallel_size(self, world_size: int) -> int:
        """DP size for a world size; raises if the world does not divide into TP x PP."""
        require(world_size % self.model_parallel_size == 0, "parallel.tensor_parallel*pipeline_parallel",
                self.model_parallel_size, f"the world size {world_size} must be a multiple of TP x PP")
        return world_size // self.model_parallel_size
