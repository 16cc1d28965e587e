"""ParallelConfig: the TP / PP / DP layout and the distributed backend."""

from __future__ import annotations

import math
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
    pipeline_first_stage_layers: int = 0
    """Decoder layers on the first pipeline stage; 0 = an even split (megatron's
    ``num_layers_in_first_pipeline_stage``). With PP > 1 and layers that do not divide evenly (Qwen2.5-VL-7B has
    28), set this and/or ``pipeline_last_stage_layers``: the middle stages share the rest evenly. The first stage
    also runs the vision tower and the embedding, the last the output layer and the loss, so lighter end stages
    also balance the pipeline."""
    pipeline_last_stage_layers: int = 0
    """Decoder layers on the last pipeline stage; 0 = an even split (``num_layers_in_last_pipeline_stage``)."""
    distributed_optimizer: bool = False
    """megatron's distributed optimizer: fp32 master weights and Adam moments sharded over the data-parallel ranks
    (ZeRO-1), gradients reduce-scattered and parameters all-gathered (overlapped with compute when DP > 1)."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """"auto": nccl when CUDA is available, gloo otherwise."""
    timeout_s: float = 600.0
    """How long a collective may wait (Megatron-LM's ``--distributed-timeout-minutes``, 10 by default). The other
    ranks wait in one while rank 0 generates a step's rollouts, and while it restarts a rollout server that died
    and syncs it: raise this when those take longer (long generations, large models that load slowly)."""
    seed: int = 1234

    def __post_init__(self) -> None:
        for name in ("tensor_parallel", "pipeline_parallel", "micro_batch_size"):
            v = getattr(self, name)
            require(isinstance(v, int) and v >= 1, f"parallel.{name}", v, "use an integer >= 1")
        require(not self.sequence_parallel or self.tensor_parallel > 1, "parallel.sequence_parallel",
                self.sequence_parallel, "sequence parallelism splits over the TP group; set tensor_parallel > 1 "
                "or sequence_parallel=false")
        require(self.timeout_s > 0, "parallel.timeout_s", self.timeout_s, "use seconds > 0")
        for name in ("pipeline_first_stage_layers", "pipeline_last_stage_layers"):
            v = getattr(self, name)
            require(isinstance(v, int) and v >= 0, f"parallel.{name}", v, "use 0 (an even split) or a layer count")
            require(v == 0 or self.pipeline_parallel > 1, f"parallel.{name}", v,
                    "uneven stages need pipeline_parallel > 1; set it to 0")

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel

    def data_parallel_size(self, world_size: int) -> int:
        """DP size for a world size; raises if the world does not divide into TP x PP."""
        require(world_size % self.model_parallel_size == 0, "parallel.tensor_parallel*pipeline_parallel",
                self.model_parallel_size, f"the world size {world_size} must be a multiple of TP x PP")
        return world_size // self.model_parallel_size


def stage_layers(num_layers: int, pipeline_parallel: int, first: int = 0, last: int = 0) -> tuple[int, ...]:
    """Decoder layers per pipeline stage, as megatron-core builds them: an even split, or ``first`` / ``last``
    layers on the end stages (0 = not set) and the rest shared evenly by the middle stages. Raises ConfigError,
    with a split that works, where megatron refuses the layout."""
    if pipeline_parallel == 1:
        return (num_layers,)
    if not first and not last:
        require(num_layers % pipeline_parallel == 0, "parallel.pipeline_parallel", pipeline_parallel,
                f"it must divide the {num_layers} decoder layers for an even split; or split unevenly: "
                f"{_suggest(num_layers, pipeline_parallel)}")
        return (num_layers // pipeline_parallel,) * pipeline_parallel
    middle_stages = pipeline_parallel - bool(first) - bool(last)
    middle_layers = num_layers - first - last
    ok = middle_layers >= 0 and bool(middle_stages) == bool(middle_layers) and (
        not middle_stages or middle_layers % middle_stages == 0)
    require(ok, "parallel.pipeline_first_stage_layers/pipeline_last_stage_layers", (first, last),
            f"{num_layers} layers over {pipeline_parallel} stages leave {middle_layers} for {middle_stages} middle "
            f"stage(s), which must share them evenly (at least one each); e.g. {_suggest(num_layers, pipeline_parallel)}")
    per_middle = middle_layers // middle_stages if middle_stages else 0
    stages = [per_middle] * middle_stages
    return tuple(([first] if first else []) + stages + ([last] if last else []))


def _suggest(num_layers: int, pp: int) -> str:
    """The most even valid split with equal end stages no heavier than the middle ones (they carry the vision
    tower / embedding and the output layer)."""
    if num_layers < pp:
        return f"every stage needs a layer: use at most {num_layers} pipeline stages"
    if pp == 2:
        return (f"parallel.pipeline_first_stage_layers={num_layers // 2} "
                f"parallel.pipeline_last_stage_layers={num_layers - num_layers // 2}")
    for middle in range(-(-num_layers // pp), num_layers + 1):
        rest = num_layers - middle * (pp - 2)
        if rest >= 2 and rest // 2 <= middle:
            return (f"parallel.pipeline_first_stage_layers={rest // 2} parallel.pipeline_last_stage_layers="
                    f"{rest - rest // 2} ({middle} on each of the {pp - 2} middle stages)")
    return f"use fewer than {pp} stages"


def check_layout(parallel: ParallelConfig, *, num_heads: int, num_kv_heads: int, num_layers: int,
                 world_size: int | None = None) -> tuple[int, ...]:
    """The one validation of a layout for a model: TP divides the attention and key/value heads, the pipeline
    split is one megatron builds, SP has a TP group, the world is a multiple of TP x PP. Returns the layers per
    stage; raises ConfigError naming the field and a fix. Used by the trainer, the converters, ``bench
    scaling`` and tools/scaling_model.py, so every layout the repository prints or ships is one that runs."""
    tp = parallel.tensor_parallel
    require(num_heads % tp == 0 and num_kv_heads % tp == 0, "parallel.tensor_parallel", tp,
            f"it must divide the {num_heads} attention heads and the {num_kv_heads} key/value heads; choose a "
            f"divisor of {math.gcd(num_heads, num_kv_heads)}")
    stages = stage_layers(num_layers, parallel.pipeline_parallel, parallel.pipeline_first_stage_layers,
                          parallel.pipeline_last_stage_layers)
    if world_size is not None:
        parallel.data_parallel_size(world_size)
    return stages
