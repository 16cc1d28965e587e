"""Build a Megatron model for conversion work, inside the current (or a fresh single-process) parallel state."""

from __future__ import annotations

import resource
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from megatron_vr1.convert.arch import arch_from_config
from megatron_vr1.convert.errors import ConversionError

_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
EMBEDDING_KEY = "language_model.embedding.word_embeddings.weight"


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch ops on one intra-op thread, restoring the setting afterwards.

    A conversion's torch ops are memory-bound copies (QKV fuse/split, vocabulary padding) that gain little from
    more threads, while OpenMP's barriers stall them when another process holds a core: on the shared 2-core host
    (other jobs running) copying the 82 MB of q_proj weights of the 1 GB benchmark took 0.54 s on two threads and
    0.08 s on one, and the whole QKV fuse 1.4 s on two."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_layout(hf_config: Any, tp: int, pp: int, pp_first: int = 0, pp_last: int = 0) -> None:
    """The trainer's layout check (``config.parallel.check_layout``) in the converters' words: TP divides the
    attention and key/value heads, the pipeline split is one megatron builds (``--pp-first`` / ``--pp-last``
    for uneven stages)."""
    from megatron_vr1.config.base import ConfigError
    from megatron_vr1.config.parallel import check_layout as check

    arch = arch_from_config(hf_config)
    if tp < 1 or pp < 1:
        raise ConversionError(f"--tp {tp} --pp {pp}: both must be >= 1")
    try:
        check(_parallel(tp, pp, pp_first, pp_last), num_heads=arch.num_heads, num_kv_heads=arch.num_kv_heads,
              num_layers=arch.num_layers)
    except ConfigError as e:
        flags = {"parallel.tensor_parallel": "--tp", "parallel.pipeline_parallel": "--pp",
                 "parallel.pipeline_first_stage_layers": "--pp-first", "parallel.pipeline_last_stage_layers": "--pp-last"}
        text = str(e)
        for field, flag in flags.items():
            text = text.replace(field + "=", flag + " ").replace(field, flag)
        raise ConversionError(text) from None


def _parallel(tp: int, pp: int, pp_first: int = 0, pp_last: int = 0):
    from megatron_vr1.config.base import ConfigError
    from megatron_vr1.config.parallel import ParallelConfig

    try:
        return ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, pipeline_first_stage_layers=pp_first,
                              pipeline_last_stage_layers=pp_last)
    except ConfigError as e:
        raise ConversionError(str(e).replace("parallel.pipeline_first_stage_layers", "--pp-first")
                              .replace("parallel.pipeline_last_stage_layers", "--pp-last")) from None


def ensure_parallel(tp: int = 1, pp: int = 1, pp_first: int = 0, pp_last: int = 0) -> None:
    """Initialise torch.distributed + megatron's groups at (tp, pp) unless this process already has them
    (a plain process becomes a world of one on gloo; under torchrun the world must be a multiple of tp*pp)."""
    from megatron.core import parallel_state as ps

    from megatron_vr1.parallel import state

    if ps.model_parallel_is_initialized() and (ps.get_tensor_model_parallel_world_size(),
                                               ps.get_pipeline_model_parallel_world_size()) == (tp, pp):
        return
    state.initialize(_parallel(tp, pp, pp_first, pp_last))


def build(hf_config: dict, dtype: str, tp: int, pp: int, padded_vocab: int, pp_first: int = 0, pp_last: int = 0):
    """This rank's model chunk at the current (tp, pp), padded to exactly ``padded_vocab`` rows."""
    from megatron_vr1.config.model import ModelConfig
    from megatron_vr1.models.build import build_model

    arch = arch_from_config(hf_config)
    if padded_vocab % tp or padded_vocab < arch.vocab_size:
        raise ConversionError(f"padded vocabulary {padded_vocab} can't hold {arch.vocab_size} tokens split over "
                              f"TP={tp}; convert again with --tp {tp}")
    # padded_vocab_size(V, tp, m) = ceil(V / (m*tp)) * m*tp; with m*tp = padded it is exactly ``padded``.
    cfg = ModelConfig(dtype=dtype, transformer_impl="local", make_vocab_size_divisible_by=padded_vocab // tp)
    # No random init: every weight is loaded or converted right after (the loaders fail naming any tensor they
    # do not fill), and on CPU megatron's init of a 1 GB model takes 6-10 s, longer than the conversion itself.
    return build_model(hf_config, cfg, _parallel(tp, pp, pp_first, pp_last),
                       config_overrides={"perform_initialization": False})


def hf_dtype(reader) -> str:
    """The dtype of the HF checkpoint (that of its embedding), as a ModelConfig dtype name."""
    name = "model.embed_tokens.weight"
    code = reader._info.get(name, next(iter(reader._info.values())))["dtype"]
    if code not in _DTYPES:
        raise ConversionError(f"{reader.dir}: {name} has dtype {code}; only F32, BF16 and F16 are supported")
    return _DTYPES[code]


def checkpoint_padded_vocab(ckpt_dir: str | Path) -> int:
    """Rows of the embedding stored in a torch_dist checkpoint (the vocabulary padding it was written with)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        md = FileSystemReader(str(ckpt_dir)).read_metadata()
    except FileNotFoundError:
        raise ConversionError(f"{ckpt_dir}: no torch_dist checkpoint here (.metadata is missing)") from None
    meta = md.state_dict_metadata.get(EMBEDDING_KEY)
    if meta is None:
        raise ConversionError(f"{ckpt_dir}: tensor {EMBEDDING_KEY!r} is not in the checkpoint; it was not written "
                              f"from a megatron_vr1 Qwen2 / Qwen2.5-VL model")
    return int(meta.size[0])


def checkpoint_dtype(ckpt_dir: str | Path) -> str:
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(ckpt_dir)).read_metadata().state_dict_metadata[EMBEDDING_KEY]
    return str(meta.properties.dtype).removeprefix("torch.")
