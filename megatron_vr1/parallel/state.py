"""Process groups: torch.distributed init, megatron parallel_state (TP / PP / DP), seeding, teardown.

The only module that sets up torch.distributed. Model code receives what it needs from here.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from megatron_vr1.config.parallel import ParallelConfig
from megatron_vr1.parallel.env import DistEnv, detect


def device() -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def backend_for(cfg: ParallelConfig) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def initialize(cfg: ParallelConfig, env: DistEnv | None = None) -> DistEnv:
    """Initialise torch.distributed (if needed) and megatron's model-parallel groups.

    On CPU the megatron-core compatibility layer is applied first. Seeds the tensor-parallel RNG with
    ``cfg.seed`` so that dropout and initialisation match across layouts.
    """
    env = env or detect()
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        if backend_for(cfg) == "gloo":
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo" if env.master_addr in ("127.0.0.1", "localhost") else "")
            if not os.environ["GLOO_SOCKET_IFNAME"]:
                del os.environ["GLOO_SOCKET_IFNAME"]
        # env:// rendezvous (under torchrun it reuses the agent's store), with the address set only for the call:
        # left in os.environ, a world of one's free port would be inherited by every process started later (a
        # Slurm job step, a converter) and bound by it while something else may have taken it since.
        saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = env.master_addr, str(env.master_port)
        try:
            dist.init_process_group(backend=backend_for(cfg), rank=env.rank, world_size=env.world_size,
                                    timeout=datetime.timedelta(seconds=cfg.timeout_s))
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    if not torch.cuda.is_available():
        from megatron_vr1.parallel import cpu_compat

        cpu_compat.apply()
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    cfg.data_parallel_size(dist.get_world_size())  # validates the layout with a clear message
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=cfg.tensor_parallel,
                                             pipeline_model_parallel_size=cfg.pipeline_parallel)
    model_parallel_cuda_manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    return env


def destroy() -> None:
    """Tear down megatron's groups and the default process group."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def tp_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank()


def tp_group():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def pp_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_rank()


def is_pipeline_first_stage() -> bool:
    from megatron.core import parallel_state

    return parallel_state.is_pipeline_first_stage()


def is_pipeline_last_stage() -> bool:
    from megatron.core import parallel_state

    return parallel_state.is_pipeline_last_stage()
