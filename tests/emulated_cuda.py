"""An emulated ``cuda:0`` for CPU-only tests: tensors that hold real CPU data, report ``cuda:0`` and refuse to mix
with plain CPU tensors the way a real GPU does, so that a tensor the trainer leaves behind on the CPU fails a CPU
test instead of the first step of a cluster job.

    with emulated_cuda():
        ...code under test, unchanged...

What it models:
- ``EmulatedCudaTensor``: a wrapper subclass whose storage is a plain CPU tensor (``.cpu_data``) and whose
  ``device`` is ``cuda:0``. Every aten op on it runs on that CPU data. An op that mixes it with a plain CPU tensor
  of one or more dimensions raises ``DeviceMixError`` naming the op and the CPU tensor's shape, as CUDA does
  ("Expected all tensors to be on the same device"). What CUDA allows is allowed here too: 0-dim CPU tensors
  (CPU scalars), CPU index tensors in advanced indexing, copies between the devices, ``.item()``.
- Device placement: ``device="cuda"`` factories, ``.cuda()``, ``.to("cuda")`` and ``Module.cuda()`` give
  emulated tensors (autograd flows through ``.to``/``.cuda`` as on a GPU); ``.cpu()`` / ``.to("cpu")`` give plain
  CPU tensors; ``.numpy()`` and ``.tolist()`` behave as on CUDA (numpy refuses, tolist copies).
- ``torch.cuda`` queries (``is_available``, ``current_device``, ``set_device``, ``device_count``, RNG state,
  ``synchronize``, streams, memory statistics, device properties) are answered by the harness: one device, index 0.
- NCCL's refusal of CPU tensors: ``torch.distributed`` collectives and point-to-point calls raise
  ``DeviceMixError`` for a plain CPU tensor unless the process group was created with ``backend="gloo"``
  (megatron-core's CPU-side groups). The collectives themselves run on gloo over the CPU data.

- The device's own random generator (``torch.cuda.default_generators[0]``, a CPU generator here): random ops on
  emulated tensors draw from it, so megatron's CUDA RNG tracker forks it as on a GPU.

What it does not model: CUDA streams and events (synchronous no-ops), NCCL itself (gloo carries the data),
memory (capacity, fragmentation; peak numbers are 0), kernels and their numerics (every op is the CPU op, so
random numbers differ from a GPU's), pinned memory, CUDA graphs, several devices (every rank is on cuda:0).

How: the wrapper lives on the meta device (a wrapper on cuda would make c10 ask for the CUDA driver), so a few
composite functions whose C++ bodies build tensors from their inputs' options run on the host as a whole
(``_HOST_FUNCTIONS``); the harness says which function to add there when it meets another one.

It never patches the code under test: only torch's ``torch.cuda`` / ``torch.accelerator`` queries,
``torch.distributed``'s collective entry points and ``Module._apply`` (so that ``Module.cuda()`` keeps parameter
attributes such as megatron's ``tensor_model_parallel``, as ``param.data = ...`` does on a GPU) are replaced, and
only inside the context. Run code under it in a fresh process: megatron_vr1's CPU compatibility layer
(``parallel.cpu_compat``) patches torch for good and must not have been applied.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

CUDA0 = torch.device("cuda", 0)
_CPU = torch.device("cpu")


class DeviceMixError(RuntimeError):
    """A plain CPU tensor met an (emulated) CUDA tensor where a GPU would refuse it."""


def _is_cuda(device: Any) -> bool:
    if device is None:
        return False
    if isinstance(device, int) and not isinstance(device, bool):
        return True  # torch reads a bare index as a CUDA device
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


def _plain_cpu(t: Any, *, scalars_ok: bool = True) -> bool:
    return (isinstance(t, torch.Tensor) and not isinstance(t, EmulatedCudaTensor) and t.device.type == "cpu"
            and not (scalars_ok and t.dim() == 0))


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


class EmulatedCudaTensor(torch.Tensor):
    """Real CPU data (``cpu_data``) that reports ``cuda:0``. The wrapper itself lives on the meta device: a
    wrapper made on ``cuda`` would make c10 ask the (absent) CUDA driver."""

    cpu_data: torch.Tensor

    @staticmethod
    def __new__(cls, data: torch.Tensor):
        if isinstance(data, EmulatedCudaTensor) or data.device.type != "cpu":
            raise TypeError(f"emulated_cuda: an emulated tensor holds CPU data, not a {type(data).__name__} on "
                            f"{data.device}")
        wrapper = torch.Tensor._make_wrapper_subclass(
            cls, data.shape, strides=data.stride(), storage_offset=data.storage_offset(), dtype=data.dtype,
            device=torch.device("meta"), requires_grad=False)
        wrapper.cpu_data = data
        return wrapper

    def __repr__(self, *, tensor_contents=None):  # noqa: D105
        return f"EmulatedCudaTensor(device='cuda:0', {self.cpu_data!r})"

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return CUDA0

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True

    @property
    def is_cpu(self) -> bool:  # type: ignore[override]
        return False

    def get_device(self) -> int:  # type: ignore[override]
        return 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handled = _TENSOR_METHODS.get(func)
        if handled is not None:
            return handled(*args, **kwargs)
        if func in _HOST_FUNCTIONS:
            return _on_host(func, args, kwargs)
        return super().__torch_function__(func, types, args, kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run_on_cpu(func, args, kwargs or {})


def _wrap(t: torch.Tensor) -> EmulatedCudaTensor:
    """``t`` as an emulated tensor; a leaf that requires grad (``torch.empty(..., requires_grad=True)``) stays one."""
    if isinstance(t, EmulatedCudaTensor):
        return t
    wrapped = EmulatedCudaTensor(t.detach())
    return wrapped.requires_grad_() if t.requires_grad else wrapped


# Ops where CUDA accepts a CPU tensor next to CUDA ones: device copies, CPU index tensors in advanced indexing.
_MIX_OK = {torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default, torch.ops.aten.copy.default,
           torch.ops.aten._copy_from.default, torch.ops.aten._copy_from_and_resize.default}
_INDEX_OPS = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default, torch.ops.aten.index_put.default,
              torch.ops.aten._index_put_impl_.default, torch.ops.aten._unsafe_index.Tensor}


def _run_on_cpu(func, args, kwargs):
    """Run ``func`` on the CPU data of its emulated arguments; refuse a CUDA-illegal mix with CPU tensors."""
    device = kwargs.get("device")
    if func is torch.ops.aten._to_copy.default and device is not None and torch.device(device).type == "cpu":
        # .to("cpu") / .cpu(): the result is a plain CPU tensor. (A meta device here is the wrapper's own options,
        # e.g. autograd casting a gradient back "to the input's device": handled below like cuda.)
        arg = args[0]
        data = arg.cpu_data if isinstance(arg, EmulatedCudaTensor) else arg
        return func(data, *args[1:], **kwargs)
    if func not in _MIX_OK:
        plain = []
        check_args = args
        if func in _INDEX_OPS:  # indices may live on the CPU; self and values may not
            check_args = (args[0],) + tuple(args[2:])
        for t in _flat_tensors(check_args, kwargs):
            if _plain_cpu(t):
                plain.append(_shape(t))
        if plain and any(isinstance(t, EmulatedCudaTensor) for t in _flat_tensors(args, kwargs)):
            raise DeviceMixError(f"device mix in {func}: cpu tensor(s) of shape {plain} with cuda:0 tensors; "
                                 "a GPU refuses this (move the tensor to the run device)")
    aliases: dict[int, EmulatedCudaTensor] = {}

    def unwrap(t):
        if isinstance(t, EmulatedCudaTensor):
            if "cpu_data" not in t.__dict__:
                raise RuntimeError(f"emulated_cuda: {func} got an emulated tensor that C++ made without its CPU data "
                                   "(a composite op's output): run the function that made it on the host, add it "
                                   "to _HOST_FUNCTIONS in tests/emulated_cuda.py")
            aliases[id(t.cpu_data)] = t
            return t.cpu_data
        if isinstance(t, torch.device) and t.type == "cuda":
            return _CPU
        return t

    stray = [_shape(t) for t in _flat_tensors(args, kwargs) if t.device.type == "meta"
             and not isinstance(t, EmulatedCudaTensor)]
    if stray:
        raise RuntimeError(f"emulated_cuda: {func} got meta tensor(s) {stray}: a composite op made them from an "
                           "emulated tensor's options (its wrapper lives on meta). Run that function on the host: "
                           "add it to _HOST_FUNCTIONS in tests/emulated_cuda.py")
    uargs = tree_map(unwrap, args)
    ukwargs = tree_map(unwrap, kwargs)
    if _GENERATOR[0] is not None and _takes_generator(func) and ukwargs.get("generator") is None:
        ukwargs["generator"] = _GENERATOR[0]  # random ops on the device draw from the device's generator
    device = ukwargs.get("device")
    if _is_cuda(device) or (_is_meta(device) and not _MADE_ON_META[0]):  # meta: the wrapper's own options
        ukwargs["device"] = _CPU
    out = func(*uargs, **ukwargs)

    def rewrap(t):
        if isinstance(t, torch.Tensor) and not isinstance(t, EmulatedCudaTensor) and t.device.type == "cpu":
            same = aliases.get(id(t))
            return same if same is not None else EmulatedCudaTensor(t)
        return t

    return tree_map(rewrap, out)


_GENERATOR: list[torch.Generator | None] = [None]
"""The emulated device's default generator (``torch.cuda.default_generators[0]``) while the harness is on."""


@functools.lru_cache(maxsize=None)
def _takes_generator(func) -> bool:
    return any(a.name == "generator" and a.kwarg_only for a in func._schema.arguments)


def _flat_tensors(args, kwargs) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    tree_map(lambda t: out.append(t) if isinstance(t, torch.Tensor) else None, (args, kwargs))
    return out


class _ToDevice(torch.autograd.Function):
    """Host <-> emulated-device transfer that autograd differentiates, like ``Tensor.to`` between devices."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, to_cuda: bool):
        ctx.to_cuda = to_cuda
        if to_cuda:
            return EmulatedCudaTensor(t.detach().clone() if t.requires_grad else t.detach())
        return t.cpu_data.detach()

    @staticmethod
    def backward(ctx, grad):
        if ctx.to_cuda:
            return (grad.cpu_data if isinstance(grad, EmulatedCudaTensor) else grad), None
        return _wrap(grad), None


class _OnHost(torch.autograd.Function):
    """Run a composite function on the CPU data of emulated inputs, differentiably: ops that build tensors from
    their inputs' options in C++ would otherwise make meta tensors from the wrapper."""

    @staticmethod
    def forward(ctx, fn, *inputs):
        host = [t.cpu_data.detach().requires_grad_(t.requires_grad) if isinstance(t, EmulatedCudaTensor) else t
                for t in inputs]
        with torch.enable_grad():
            out = fn(*host)
        ctx.host, ctx.out = host, out
        return EmulatedCudaTensor(out.detach())

    @staticmethod
    def backward(ctx, grad):
        wanted = [i for i, t in enumerate(ctx.host) if isinstance(t, torch.Tensor) and t.requires_grad]
        grads = torch.autograd.grad(ctx.out, [ctx.host[i] for i in wanted],
                                    grad.cpu_data if isinstance(grad, EmulatedCudaTensor) else grad, allow_unused=True)
        out: list[Any] = [None] * len(ctx.host)
        for i, g in zip(wanted, grads):
            out[i] = None if g is None else EmulatedCudaTensor(g)
        return (None, *out)


def _on_host(func, args, kwargs):
    plain = [_shape(t) for t in _flat_tensors(args, kwargs) if _plain_cpu(t)]
    if plain:
        raise DeviceMixError(f"device mix in {getattr(func, '__name__', func)}: cpu tensor(s) of shape {plain} with "
                             "cuda:0 tensors; a GPU refuses this (move the tensor to the run device)")
    # Tensor keyword arguments (an attention mask) go in positionally, so that autograd sees every tensor input.
    names = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    fixed = {k: v for k, v in kwargs.items() if k not in names}

    def call(*values):
        return func(*values[:len(args)], **fixed, **dict(zip(names, values[len(args):])))

    return _OnHost.apply(call, *args, *(kwargs[k] for k in names))


# Composite functions whose C++ bodies build tensors from their inputs' options or with Python dispatch off
# (found by running the trainer under the harness): SDPA's math path, and the norms' reduced-precision paths.
_HOST_FUNCTIONS = {torch.nn.functional.scaled_dot_product_attention, torch.nn.functional.rms_norm,
                   torch.nn.functional.layer_norm}


def _tensor_to(self, *args, **kwargs):
    """``Tensor.to`` with the device part done by the harness (torch parses the rest)."""
    kwargs = dict(kwargs)
    copy = bool(kwargs.pop("copy", False))
    if len(args) > 3 and isinstance(args[3], bool):  # to(device, dtype, non_blocking, copy)
        copy, args = args[3], args[:3]
    device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
    emulated = isinstance(self, EmulatedCudaTensor)
    out = self
    if device is not None and _is_cuda(device) != emulated:
        out = _ToDevice.apply(self, not emulated)
        copy = False  # the transfer made a new tensor
    if dtype is not None or copy or memory_format is not None:
        rest = {"dtype": dtype or out.dtype, "copy": copy}
        if memory_format is not None:
            rest["memory_format"] = memory_format
        with torch._C.DisableTorchFunctionSubclass():
            out = torch.Tensor.to(out, **rest)
    return out


def _tensor_cuda(self, device=None, non_blocking=False, memory_format=torch.preserve_format):
    if isinstance(self, EmulatedCudaTensor):
        return self
    return _ToDevice.apply(self, True)


def _tensor_cpu(self, memory_format=torch.preserve_format):
    if isinstance(self, EmulatedCudaTensor):
        return _ToDevice.apply(self, False)
    return self


def _tensor_numpy(self, *a, **k):
    raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to host "
                    "memory first.")


def _tensor_tolist(self):
    return self.cpu_data.tolist()


def _tensor_type(self, *args, **kwargs):
    if args or kwargs:
        with torch._C.DisableTorchFunctionSubclass():
            return torch.Tensor.type(self, *args, **kwargs)
    return torch.Tensor.type(self.cpu_data).replace("torch.", "torch.cuda.", 1)


def _set_data(self, value):
    """``param.data = x`` (DDP buffers, dtype casts): the wrapper's metadata and its CPU storage follow ``x``."""
    if not isinstance(value, EmulatedCudaTensor):
        raise DeviceMixError(f"param.data = a {value.device} tensor of shape {_shape(value)} on a cuda:0 parameter")
    with torch._C.DisableTorchFunctionSubclass():
        torch.Tensor.data.__set__(self, value)
    self.cpu_data = value.cpu_data


def _data_ptr(self):
    return self.cpu_data.data_ptr()


def _untyped_storage(self):
    return self.cpu_data.untyped_storage()


def _pin_memory(self, *a, **k):
    raise RuntimeError("cannot pin 'torch.cuda.FloatTensor' only dense CPU tensors can be pinned")


_TENSOR_METHODS = {
    torch.Tensor.to: _tensor_to, torch.Tensor.cuda: _tensor_cuda, torch.Tensor.cpu: _tensor_cpu,
    torch.Tensor.numpy: _tensor_numpy, torch.Tensor.tolist: _tensor_tolist, torch.Tensor.type: _tensor_type,
    torch.Tensor.data.__set__: _set_data, torch.Tensor.data_ptr: _data_ptr,
    torch.Tensor.untyped_storage: _untyped_storage, torch.Tensor.pin_memory: _pin_memory,
}


_RANDOM_FACTORIES = {torch.randn, torch.rand, torch.randint, torch.randperm}


def _holds_emulated(data: Any) -> bool:
    if isinstance(data, EmulatedCudaTensor):
        return True
    return isinstance(data, (list, tuple)) and any(_holds_emulated(d) for d in data)


def _tensor_from_data(func, args, kwargs):
    """``torch.tensor(data)`` with emulated tensors in ``data``: as on CUDA, a tensor argument keeps its device
    and a list of (scalar) tensors is read element by element into a new tensor on the requested device (torch
    reads them in C++ with Python dispatch off, which would see the wrapper's meta storage)."""
    data = args[0]
    host = data.cpu_data if isinstance(data, EmulatedCudaTensor) else tree_map(
        lambda t: t.cpu_data if isinstance(t, EmulatedCudaTensor) else t, list(data))
    device = kwargs.get("device", CUDA0 if isinstance(data, EmulatedCudaTensor) else None)
    k = {**kwargs, "device": _CPU}
    out = func(host, *args[1:], **k)
    return _wrap(out) if _is_cuda(device) else out


class _PlacementMode(TorchFunctionMode):
    """Host-side entry points into the emulated device: ``device="cuda"`` factories and ``.to``/``.cuda`` of
    plain tensors (intercepted before torch would initialise the CUDA driver)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to and args and not isinstance(args[0], EmulatedCudaTensor):
            return _tensor_to(*args, **kwargs)
        if func is torch.Tensor.cuda and args and not isinstance(args[0], EmulatedCudaTensor):
            return _tensor_cuda(*args, **kwargs)
        if func is torch.Tensor.pin_memory and not isinstance(args[0], EmulatedCudaTensor):
            return args[0]  # page-locking is a no-op here; the data stays where it is
        if func in (torch.tensor, torch.as_tensor) and args and _holds_emulated(args[0]):
            return _tensor_from_data(func, args, kwargs)
        if _is_meta(kwargs.get("device")):  # a meta tensor asked for in Python (lazy init): keep it on meta
            _MADE_ON_META[0] += 1
            try:
                return func(*args, **kwargs)
            finally:
                _MADE_ON_META[0] -= 1
        if _is_cuda(kwargs.get("device")) and func is not torch._C._nn._parse_to:  # a factory: made on the host
            k = dict(kwargs)
            k["device"] = _CPU
            if func in _RANDOM_FACTORIES and k.get("generator") is None:
                k["generator"] = _GENERATOR[0]
            out = func(*args, **k)
            return tree_map(lambda t: _wrap(t) if isinstance(t, torch.Tensor) else t, out)
        return func(*args, **kwargs)


_MADE_ON_META = [0]


def _is_meta(device: Any) -> bool:
    return (isinstance(device, str) and device == "meta") or (isinstance(device, torch.device) and
                                                              device.type == "meta")


class _FactoryMode(TorchDispatchMode):
    """Factories that reach the dispatcher from C++ (no Python frame to intercept): ``device=cuda`` ones, and
    ``device=meta`` ones that a composite op or a backward formula made from an emulated tensor's options
    (``at::zeros({}, grad.options())``): both become emulated tensors."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if (_is_cuda(device) or (_is_meta(device) and not _MADE_ON_META[0])) and not any(isinstance(t, EmulatedCudaTensor)
                                                      for t in _flat_tensors(args, {})):
            k = dict(kwargs)
            k["device"] = _CPU
            return tree_map(lambda t: _wrap(t) if isinstance(t, torch.Tensor) else t, func(*args, **k))
        return func(*args, **kwargs)


# ---- torch.cuda answers ----------------------------------------------------------------------------------------

class _Stream:
    """A CUDA stream that is always idle: work runs synchronously on the CPU."""

    def __init__(self, *a, **k):
        self.device = CUDA0

    def wait_stream(self, *a, **k):
        pass

    def wait_event(self, *a, **k):
        pass

    def record_event(self, event=None):
        return event or _Event()

    def synchronize(self):
        pass

    def query(self):
        return True

    def is_capturing(self):
        return False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Event:
    def __init__(self, *a, **k):
        pass

    def record(self, *a, **k):
        pass

    def wait(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _DeviceProperties:
    name = "emulated cuda:0 (tests/emulated_cuda.py)"
    major, minor = 9, 0
    total_memory = 80 * (1 << 30)
    multi_processor_count = 132


def _cuda_answers(generator: torch.Generator) -> dict[str, Any]:
    current = {"device": 0}

    def set_device(device):
        index = device.index if isinstance(device, torch.device) else int(str(device).rsplit(":", 1)[-1]) \
            if isinstance(device, str) and ":" in device else (0 if isinstance(device, str) else int(device))
        if index not in (0, None):
            raise RuntimeError(f"emulated_cuda: one device; set_device({device!r})")

    def get_rng_state(device="cuda"):
        return generator.get_state()

    def set_rng_state(state, device="cuda"):
        generator.set_state(state)

    def manual_seed(seed):
        generator.manual_seed(int(seed))

    zero = lambda *a, **k: 0  # noqa: E731
    return {
        "is_available": lambda: True, "is_initialized": lambda: True, "device_count": lambda: 1,
        "current_device": lambda: current["device"], "set_device": set_device, "_lazy_init": lambda: None,
        "synchronize": lambda *a, **k: None, "current_stream": lambda *a, **k: _Stream(),
        "default_stream": lambda *a, **k: _Stream(), "Stream": _Stream, "Event": _Event,
        "stream": lambda s=None: contextlib.nullcontext(), "set_stream": lambda s: None,
        "get_rng_state": get_rng_state, "set_rng_state": set_rng_state, "manual_seed": manual_seed,
        "manual_seed_all": manual_seed, "seed": lambda: None, "initial_seed": lambda: generator.initial_seed(),
        "get_rng_state_all": lambda: [generator.get_state()], "default_generators": (generator,),
        "memory_allocated": zero, "max_memory_allocated": zero, "memory_reserved": zero,
        "max_memory_reserved": zero, "reset_peak_memory_stats": lambda *a, **k: None,
        "empty_cache": lambda: None, "get_device_capability": lambda *a, **k: (9, 0),
        "get_device_name": lambda *a, **k: _DeviceProperties.name,
        "get_device_properties": lambda *a, **k: _DeviceProperties(), "is_bf16_supported": lambda *a, **k: True,
        "mem_get_info": lambda *a, **k: (_DeviceProperties.total_memory, _DeviceProperties.total_memory),
        "is_current_stream_capturing": lambda: False, "_initialized": True,
    }


def _accelerator_answers(cuda: dict[str, Any]) -> dict[str, Any]:
    return {"is_available": lambda: True, "device_count": lambda: 1,
            "current_accelerator": lambda check_available=False: torch.device("cuda"),
            "current_device_index": lambda: 0, "current_device_idx": lambda: 0,
            "set_device_index": cuda["set_device"], "set_device_idx": cuda["set_device"],
            "current_stream": cuda["current_stream"], "synchronize": cuda["synchronize"]}


# ---- torch.distributed: NCCL refuses CPU tensors -----------------------------------------------------------------

_COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "_all_gather_base", "reduce",
                "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base", "all_to_all",
                "all_to_all_single", "gather", "scatter", "send", "recv", "isend", "irecv")


def _group_of(args, kwargs):
    if "group" in kwargs:
        return kwargs["group"]
    for a in args:
        if isinstance(a, dist.ProcessGroup):
            return a
    return None


def _checked(name: str, fn, gloo_groups: set[int]):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        group = _group_of(args, kwargs)
        if group is None or id(group) not in gloo_groups:
            cpu = [_shape(t) for t in _flat_tensors(args, kwargs) if _plain_cpu(t, scalars_ok=False)]
            if cpu:
                raise DeviceMixError(f"torch.distributed.{name} got cpu tensor(s) of shape {cpu} on a process group "
                                     "that is NCCL on a GPU machine; NCCL has no CPU backend (move them to the "
                                     "run device first)")
        return fn(*args, **kwargs)

    return call


def _checked_batch(fn, gloo_groups: set[int]):
    @functools.wraps(fn)
    def call(p2p_ops):
        for op in p2p_ops:
            if (op.group is None or id(op.group) not in gloo_groups) and _plain_cpu(op.tensor, scalars_ok=False):
                raise DeviceMixError(f"torch.distributed.batch_isend_irecv got a cpu tensor of shape "
                                     f"{_shape(op.tensor)}; NCCL has no CPU backend")
        return fn(p2p_ops)

    return call


def _recording_new_group(fn, gloo_groups: set[int]):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        group = fn(*args, **kwargs)
        backend = kwargs.get("backend", args[2] if len(args) > 2 else None)
        if group is not None and str(backend or "").lower() == "gloo":
            gloo_groups.add(id(group))
        return group

    return call


# ---- Module.cuda() keeps parameter attributes ---------------------------------------------------------------------

def _attribute_keeping_apply(original):
    """``Module._apply`` that carries a parameter's Python attributes (megatron's ``tensor_model_parallel``,
    ``average_gradients_across_tp_domain``, ...) over to its emulated replacement. On a GPU ``.cuda()`` keeps the
    same Parameter object (``param.data = ...``); a CPU tensor cannot take an emulated one's storage that way."""

    def _apply(self, fn, recurse=True):
        saved = {key: dict(vars(p)) for key, p in self._parameters.items() if p is not None}
        out = original(self, fn, recurse)
        for key, attributes in saved.items():
            p = self._parameters.get(key)
            if p is None:
                continue
            for name, value in attributes.items():
                if name not in ("cpu_data", "_is_param") and not hasattr(p, name):
                    setattr(p, name, value)
        return out

    return _apply


@contextlib.contextmanager
def emulated_cuda(seed: int = 0):
    """Run the body with one emulated CUDA device (see the module docstring). Not re-entrant."""
    import torch.cuda.random as cuda_random

    generator = torch.Generator().manual_seed(seed)
    saved: list[tuple[Any, str, Any]] = []

    def replace(owner, name, value):
        saved.append((owner, name, getattr(owner, name, None)))
        setattr(owner, name, value)

    gloo_groups: set[int] = set()
    answers = _cuda_answers(generator)
    if _GENERATOR[0] is not None:
        raise RuntimeError("emulated_cuda() is not re-entrant")
    _GENERATOR[0] = generator
    try:
        for name, value in answers.items():
            replace(torch.cuda, name, value)
        for name, value in _accelerator_answers(answers).items():
            if hasattr(torch.accelerator, name):
                replace(torch.accelerator, name, value)
        for name in ("get_rng_state", "set_rng_state", "manual_seed", "manual_seed_all", "get_rng_state_all",
                     "initial_seed", "seed"):
            if hasattr(cuda_random, name):
                replace(cuda_random, name, answers[name])
        for name in _COLLECTIVES:
            if hasattr(dist, name):
                checked = _checked(name, getattr(dist, name), gloo_groups)
                replace(dist, name, checked)
                if name in ("isend", "irecv"):  # P2POp accepts only the module's own isend / irecv objects
                    replace(dist.distributed_c10d, name, checked)
        replace(dist, "batch_isend_irecv", _checked_batch(dist.batch_isend_irecv, gloo_groups))
        replace(dist, "new_group", _recording_new_group(dist.new_group, gloo_groups))
        replace(torch.nn.Module, "_apply", _attribute_keeping_apply(torch.nn.Module._apply))
        with _PlacementMode(), _FactoryMode():
            yield
    finally:
        _GENERATOR[0] = None
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


def on_emulated_device(t: Any) -> bool:
    return isinstance(t, EmulatedCudaTensor)
