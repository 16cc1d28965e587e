"""Offline HF -> Megatron: a Hugging Face safetensors checkpoint -> a torch_dist checkpoint loadable at any TP/PP.

One process builds the model at TP=1/PP=1 (torch_dist stores global shapes, so the layout at load time is free)
with the vocabulary padded for the target ``--tp`` and no random init, binds the HF tensors to it one table entry
at a time and saves. Binding copies only what must change layout (QKV interleave, vocabulary padding, dtype
casts): other parameters become views of the memory-mapped HF files and gate/up are written from their HF halves,
so the torch_dist writer reads the page cache directly. Peak memory is at most about one copy of the model.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from megatron_vr1.convert.arch import arch_from_config, load_config, padded_vocab
from megatron_vr1.convert.hf_loader import bind_hf_weights
from megatron_vr1.convert.mcore_ckpt import save_checkpoint
from megatron_vr1.convert.safetensors_io import SafetensorsReader
from megatron_vr1.convert.session import (build, check_layout, ensure_parallel, hf_dtype, peak_rss_bytes,
                                          single_threaded)


@dataclass(frozen=True, slots=True)
class ConvertReport:
    seconds: float
    """Streaming + writing time (excludes imports, process-group setup and building the model)."""
    bytes_read: int
    peak_rss_bytes: int
    padded_vocab: int
    dtype: str
    fsync_seconds: float = 0.0
    """Part of ``seconds``: fsync of the written files before the atomic rename (disk-bound; 0 when not done)."""

    def summary(self) -> str:
        gb = self.bytes_read / 1e9
        return (f"{gb:.3f} GB in {self.seconds:.2f} s ({gb / max(self.seconds, 1e-9):.2f} GB/s), peak RSS "
                f"{self.peak_rss_bytes / 2**30:.2f} GiB, dtype {self.dtype}, padded vocab {self.padded_vocab}"
                + (f", of which fsync {self.fsync_seconds:.2f} s" if self.fsync_seconds else ""))


def convert_hf_to_mcore(hf_dir: str | Path, out_dir: str | Path, *, tp: int = 1, pp: int = 1,
                        dtype: str | None = None, pp_first: int = 0, pp_last: int = 0) -> ConvertReport:
    """Write ``out_dir`` (torch_dist) from the HF checkpoint in ``hf_dir``; vocabulary padded for ``tp``.
    ``dtype``: float32 / bfloat16 / float16, default the checkpoint's own. ``pp`` / ``pp_first`` / ``pp_last``
    only check the layout the trainer will load it at (torch_dist stores global tensors: any layout loads it)."""
    config = load_config(hf_dir)
    check_layout(config, tp, pp, pp_first, pp_last)
    reader = SafetensorsReader(hf_dir)  # validates every header: a truncated file fails here, named
    dtype = dtype or hf_dtype(reader)
    padded = padded_vocab(arch_from_config(config).vocab_size, tp)
    ensure_parallel(1, 1)
    model = build(config, dtype, 1, 1, padded)
    start = time.perf_counter()
    timings: dict[str, float] = {}
    with single_threaded():
        # Zero-copy: parameters become views of the mapped HF files where the layout allows, so the save reads the
        # page cache directly; the model is only ever read from before it is dropped.
        bound = bind_hf_weights(model, reader, config)
        reader.close()  # the views keep their mappings alive
        save_checkpoint(model, out_dir, {"source": str(hf_dir), "padded_vocab": padded, "tp": tp, "pp": pp,
                                         "dtype": dtype, "format": "torch_dist"}, timings,
                        row_blocks=bound.row_blocks)
    nbytes = bound.nbytes
    report = ConvertReport(time.perf_counter() - start, nbytes, peak_rss_bytes(), padded, dtype,
                           timings.get("fsync_seconds", 0.0))
    (Path(out_dir) / "convert_report.json").write_text(json.dumps(asdict(report), indent=2))
    return report
