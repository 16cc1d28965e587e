"""Run megatron-core 0.19.2 on CPU with gloo.

megatron-core assumes CUDA in a handful of places. Each patch below was found necessary by ablation
(tests/unit/test_megatron_cpu.py runs the paths): remove one and a real code path fails. They patch private functions of
megatron-core 0.19.2, so ``apply()`` refuses any other version. It is applied by ``parallel.state`` only when
CUDA is unavailable, and is never imported by model code.

Patches:
1. ``torch.cuda.current_device()`` -> the CPU device (buffers, rotary inv_freq, gather buffers, DDP).
2. The tensor-parallel RNG tracker keeps CPU generator states instead of CUDA ones.
3. ``torch.cuda.synchronize`` / ``current_stream`` become no-ops (DDP grad sync, dist_checkpointing save).
4. ``device="cuda"`` in tensor factories, ``.cuda()`` and ``.to("cuda")`` map to the CPU (optimizer,
   schedules, default causal mask, tied embeddings under PP).
5. ``Tensor.type()`` reports ``torch.cuda.*`` (megatron's optimizers check it; torch itself never calls it
   without arguments).
6. Sequence parallelism with the torch norm of the local spec: build the norm, tag its params
   ``sequence_parallel`` so finalize_model_grads all-reduces them over TP (what Apex's norm does).
"""

from __future__ import annotations

import copy
import logging

import torch

SUPPORTED_MEGATRON_CORE = "0.19.2"
_CPU = torch.device("cpu")
_APPLIED = False
_FACTORIES = ("tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "randn", "rand", "randint",
              "zeros_like", "ones_like", "empty_like", "full_like")


class UnsupportedMegatronVersion(RuntimeError):
    pass


def _is_cuda(device) -> bool:
    return (isinstance(device, torch.device) and device.type == "cuda") or (
        isinstance(device, str) and device.startswith("cuda"))


class _NullStream:
    def wait_event(self, *a, **k):
        pass

    def wait_stream(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def record_event(self, *a, **k):
        return None


def is_applied() -> bool:
    return _APPLIED


def check_version() -> None:
    from importlib.metadata import version

    # The distribution version; megatron.core.package_info appends the *current directory's* git hash.
    installed = version("megatron-core")
    if installed != SUPPORTED_MEGATRON_CORE:
        raise UnsupportedMegatronVersion(
            f"the CPU compatibility layer patches private functions of megatron-core {SUPPORTED_MEGATRON_CORE}, "
            f"but megatron-core {installed} is installed. Install the pinned version "
            f"(pip install megatron-core=={SUPPORTED_MEGATRON_CORE}) or run on a GPU, where no patch is applied.")


def apply() -> None:
    """Patch torch and megatron-core for CPU execution. Idempotent. Call after init_process_group("gloo")
    and before building models or seeding the model-parallel RNG."""
    global _APPLIED
    if _APPLIED:
        return
    if torch.cuda.is_available():
        raise RuntimeError("cpu_compat.apply() called on a CUDA host; the CPU layer is only for CPU runs")
    check_version()
    _APPLIED = True

    # 1. allocations with device=torch.cuda.current_device()
    torch.cuda.current_device = lambda: _CPU

    # 2. the tensor-parallel RNG tracker on CPU generator states
    import megatron.core.tensor_parallel.random as mrand

    def _get_state(device="cuda", clone=False, graph_safe=False):
        state = torch.get_rng_state()
        return state.clone() if clone else state

    mrand._get_cuda_rng_state = _get_state
    mrand._set_cuda_rng_state = lambda state, device=-1, graph_safe=False: torch.set_rng_state(state)

    def _add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_ or name in self.states_:
            raise Exception(f"rng seed {seed} / state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    mrand.CudaRNGStatesTracker.add = _add
    logging.getLogger(mrand.__name__).setLevel(logging.ERROR)

    # 3. stream / synchronize calls
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_stream = lambda *a, **k: _NullStream()

    # 4. hard-coded device="cuda", .cuda(), .to("cuda")
    def _wrap(fn):
        def factory(*args, **kwargs):
            if _is_cuda(kwargs.get("device")):
                kwargs["device"] = _CPU
            return fn(*args, **kwargs)
        return factory

    # `with torch.device(...)` (transformers' meta-device init in from_pretrained) only redirects factories that
    # are in torch's lru-cached constructor set; fill it with the originals before wrapping, or the wrapped
    # factories escape the context and e.g. rotary inv_freq buffers end up uninitialised.
    from torch.utils import _device as device_context

    device_context._device_constructors()
    for name in _FACTORIES:
        setattr(torch, name, _wrap(getattr(torch, name)))
    torch.Tensor.cuda = lambda self, *a, **k: self
    orig_to = torch.Tensor.to

    def _to(self, *args, **kwargs):
        if args and _is_cuda(args[0]):
            args = (_CPU,) + tuple(args[1:])
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = _CPU
        return orig_to(self, *args, **kwargs)

    torch.Tensor.to = _to

    # 5. param.type() == "torch.cuda.FloatTensor" checks in megatron's optimizers
    orig_type = torch.Tensor.type

    def _type(self, *args, **kwargs):
        if args or kwargs:
            return orig_type(self, *args, **kwargs)
        t = orig_type(self)
        return t if ".cuda." in t else t.replace("torch.", "torch.cuda.", 1)

    torch.Tensor.type = _type

    # 6. sequence parallel with the local spec's torch norm
    from megatron.core.transformer import torch_norm

    orig_new = torch_norm.WrappedTorchNorm.__new__

    def __new__(cls, config, hidden_size, eps=1e-5, **kw):
        sp = config.sequence_parallel
        if sp:
            config = copy.copy(config)
            config.sequence_parallel = False
        norm = orig_new(cls, config, hidden_size, eps, **kw)
        for p in norm.parameters():
            p.sequence_parallel = sp
        return norm

    torch_norm.WrappedTorchNorm.__new__ = __new__
