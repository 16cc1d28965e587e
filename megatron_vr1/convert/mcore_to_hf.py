"""Offline Megatron -> HF: a torch_dist checkpoint -> safetensors shards + index + the reference dir's config,
tokenizer and processor files. The tensors come from the one streaming exporter, so the offline export, disk
sync and live sync produce the same names and bytes.

``convert_mcore_to_hf`` (one process, TP=1/PP=1: torch_dist reshards on load) lays the output shards out first
and loads the checkpoint straight into them (``mapped_output``); ``write_hf`` writes the exporter's tensors from a
live, possibly TP/PP-sharded model (rank 0 writes).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from megatron_vr1.convert.arch import load_config
from megatron_vr1.convert.errors import ConversionError
from megatron_vr1.convert.exporter import export_buckets, export_hf_tensors
from megatron_vr1.convert.hf_to_mcore import ConvertReport
from megatron_vr1.convert.mapped_output import MappedHFOutput
from megatron_vr1.convert.mcore_ckpt import load_checkpoint
from megatron_vr1.convert.safetensors_io import ShardedSafetensorsWriter
from megatron_vr1.convert.session import (build, checkpoint_dtype, checkpoint_padded_vocab, ensure_parallel,
                                          peak_rss_bytes, single_threaded)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".index.json")


def copy_reference_files(ref_dir: Path, out_dir: Path) -> list[str]:
    """Copy config, generation config, tokenizer, chat template and processor files (everything but weights)."""
    copied = []
    for p in sorted(ref_dir.iterdir()):
        if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES) and not p.name.startswith("."):
            shutil.copy2(p, out_dir / p.name)
            copied.append(p.name)
    return copied


def _fresh_tmp_dir(out_dir: Path) -> Path:
    """``<out>.tmp``, emptied, after checking that ``out_dir`` is new or empty."""
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConversionError(f"{out_dir}: exists and is not empty; choose a new --out directory or delete it")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def _publish(tmp: Path, ref_dir: Path, out_dir: Path) -> None:
    """Add the reference dir's non-weight files to the complete ``tmp`` and rename it to ``out_dir``."""
    copy_reference_files(ref_dir, tmp)
    if out_dir.exists():
        out_dir.rmdir()
    os.replace(tmp, out_dir)


def write_hf(model, hf_config: dict, ref_dir: Path, out_dir: Path, *, max_shard_bytes: int,
             bucket_bytes: int = 512 * 2**20) -> int:
    """Export ``model`` (collective over its model-parallel group) and, on global rank 0, write the HF directory
    atomically (``<out>.tmp`` renamed at the end). Returns the bytes written (0 on other ranks)."""
    import torch.distributed as dist

    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    tmp = writer = None
    if rank0:
        tmp = _fresh_tmp_dir(out_dir)
        writer = ShardedSafetensorsWriter(tmp, max_shard_bytes)
    # copy=False: the writer writes gate/up halves and the vocabulary cut straight from the model's memory
    # (the model does not change until the export is written), instead of cloning ~half the model first.
    for bucket in export_buckets(model, bucket_bytes, hf_config, copy=False):
        if writer is not None:
            for name, tensor in bucket:
                writer.add(name, tensor)
    if writer is None:
        return 0
    writer.close()
    _publish(tmp, ref_dir, out_dir)
    return writer.total_bytes


def convert_mcore_to_hf(ckpt_dir: str | Path, hf_config_dir: str | Path, out_dir: str | Path, *,
                        max_shard_bytes: int = 5 * 2**30) -> ConvertReport:
    """Write an HF checkpoint directory ``out_dir`` from the torch_dist checkpoint ``ckpt_dir``; the architecture,
    tokenizer and processor come from ``hf_config_dir`` (the HF checkpoint it was converted from)."""
    config = load_config(hf_config_dir)
    padded = checkpoint_padded_vocab(ckpt_dir)
    dtype = checkpoint_dtype(ckpt_dir)
    ensure_parallel(1, 1)
    model = build(config, dtype, 1, 1, padded)
    out_dir = Path(out_dir)
    start = time.perf_counter()
    tmp = _fresh_tmp_dir(out_dir)
    # The output shards are laid out and mapped first; the parameters that are plain row ranges of their HF
    # tensors become slices of them, so the load below reads the checkpoint straight into the output files.
    output = MappedHFOutput(model, config, tmp, max_shard_bytes)
    with single_threaded():
        load_checkpoint(model, ckpt_dir)
        _place_all(model, config, output)
    output.close()
    del model  # the parameters view the mappings
    output.unmap()
    _publish(tmp, Path(hf_config_dir), out_dir)
    return ConvertReport(time.perf_counter() - start, output.total_bytes, peak_rss_bytes(), padded, dtype)


def _place_all(model, config: dict, output: MappedHFOutput) -> None:
    """Every exported tensor into its slot of the output (views of bound parameters are already there)."""
    for name, tensor in export_hf_tensors(model, config, copy=False):
        output.place(name, tensor)
