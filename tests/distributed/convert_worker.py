"""torchrun worker (4 gloo ranks) for the converter: one launch covers every layout.

HF (tiny Qwen2.5-VL, untied and tied) -> offline hf-to-mcore -> for TP1, TP2, PP2, TP2xPP2: load + logits vs
transformers (convert verify); TP2xPP2: export -> HF byte-identical; TP2 save -> TP1 load -> export identical;
a config that does not match the checkpoint -> ConversionError naming the tensor. Rank r writes rank{r}.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _identical(a_dir: Path, b_dir: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    a, b = load_file(str(a_dir / "model.safetensors")), load_file(str(b_dir / "model.safetensors"))
    differ = sorted(k for k in a if k not in b or a[k].dtype != b[k].dtype
                    or not torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)))
    return {"same_names": sorted(a) == sorted(b), "differ": differ, "n": len(a)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--hf", required=True)
    p.add_argument("--hf-tied", required=True)
    p.add_argument("--work", required=True)
    args = p.parse_args()
    import torch.distributed as dist

    from megatron_vr1.convert.errors import ConversionError
    from megatron_vr1.convert.exporter import export_buckets
    from megatron_vr1.convert.hf_to_mcore import convert_hf_to_mcore
    from megatron_vr1.convert.mcore_ckpt import load_checkpoint, save_checkpoint
    from megatron_vr1.convert.mcore_to_hf import write_hf
    from megatron_vr1.convert.session import build, checkpoint_padded_vocab, ensure_parallel
    from megatron_vr1.convert.verify import verify
    from megatron_vr1.convert.arch import load_config

    work, result = Path(args.work), {}
    hf, hf_tied = Path(args.hf), Path(args.hf_tied)
    ckpt, ckpt_tied, ckpt_tp2 = work / "ckpt", work / "ckpt_tied", work / "ckpt_tp2"
    convert_hf_to_mcore(hf, ckpt, tp=2)            # collective: 4 data-parallel TP1 ranks, one checkpoint
    convert_hf_to_mcore(hf_tied, ckpt_tied, tp=2)
    rank = dist.get_rank()
    # Tied embeddings at TP2 x PP2: the output layer on the last stage is the first stage's embedding.
    for name, src, ck, tp, pp in (("untied", hf, ckpt, 1, 1), ("untied", hf, ckpt, 2, 1), ("untied", hf, ckpt, 1, 2),
                                  ("tied", hf_tied, ckpt_tied, 2, 2)):
        r = verify(src, ck, tp=tp, pp=pp, tolerance=1e-5)
        if r is not None:
            result[f"logits_{name}_tp{tp}_pp{pp}"] = r.max_abs_diff
    config, config_tied = load_config(hf), load_config(hf_tied)
    # HF -> Megatron (TP=2, PP=2) -> HF, tensor by tensor, both tie settings.
    ensure_parallel(2, 2)
    for name, src, ck, cfg in (("untied", hf, ckpt, config), ("tied", hf_tied, ckpt_tied, config_tied)):
        model = build(cfg, "float32", 2, 2, checkpoint_padded_vocab(ck))
        load_checkpoint(model, ck)
        write_hf(model, cfg, src, work / f"back_tp2pp2_{name}", max_shard_bytes=2**30)
        dist.barrier()
        if rank == 0:
            result[f"roundtrip_tp2pp2_{name}"] = _identical(src, work / f"back_tp2pp2_{name}")
        if name == "untied":  # buckets of <= 20 kB (larger tensors alone) and transformers 5's in-memory names
            buckets = list(export_buckets(model, 20_000, cfg))
            sizes = [sum(t.numel() * t.element_size() for _, t in b) for b in buckets]
            memory = [n for b in export_buckets(model, 2**30, cfg, layout="memory") for n, _ in b]
            result["buckets"] = {"n": len(buckets), "within": all(s <= 20_000 or len(b) == 1
                                                                  for s, b in zip(sizes, buckets)),
                                 "names": sorted(n for b in buckets for n, _ in b), "memory_names": sorted(memory)}
    # A checkpoint written at TP=2 loads at TP=1.
    ensure_parallel(2, 1)
    model = build(config, "float32", 2, 1, 512)
    load_checkpoint(model, ckpt)
    save_checkpoint(model, ckpt_tp2, {"tp": 2})
    ensure_parallel(1, 1)
    model = build(config, "float32", 1, 1, 512)
    load_checkpoint(model, ckpt_tp2)
    write_hf(model, config, hf, work / "back_tp2_to_tp1", max_shard_bytes=2**30)
    dist.barrier()
    if rank == 0:
        result["tp2_ckpt_at_tp1"] = _identical(hf, work / "back_tp2_to_tp1")
    # The tied config with the untied checkpoint: the error names the tensor.
    try:
        load_checkpoint(build(config_tied, "float32", 1, 1, checkpoint_padded_vocab(ckpt_tied)), ckpt)
        result["mismatch_error"] = None
    except ConversionError as e:
        result["mismatch_error"] = str(e)
    (Path(args.out) / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":  # dist_checkpointing's workers re-import this module
    main()
