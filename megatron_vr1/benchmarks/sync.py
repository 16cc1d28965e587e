"""``megatron-vr1 bench sync``: seconds and GB/s of a full weight sync per transport, against a real SGLang server.

A ~1 GB float32 Qwen2.5-VL (random weights, the tiny model's tokenizer/processor) is written once, one server is
launched from it, and every transport pushes the whole state dict ``--repeats`` times (pause → push → version
check → continue, i.e. what training pays). The baseline is a plain in-memory copy of the same bytes, measured
in the same process, so the table reads as "how many memcpy's a sync costs" on this machine.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

BIG_TEXT = dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=10, num_attention_heads=12,
                num_key_value_heads=2)
"""~245 M parameters = ~1 GB in float32 (the vision tower stays tiny)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work-dir", default="runs/bench_sync", help="where the model and logs go (reused)")
    parser.add_argument("--transports", default="tensor,distributed,disk")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--bucket-mb", type=int, default=512)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")


def build_model(out: Path) -> Path:
    """Write the ~1 GB checkpoint (idempotent)."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    from megatron_vr1.data.tiny_model import build_tiny_model

    tiny = build_tiny_model(out.with_name("tiny"), preset="test")
    config = AutoConfig.from_pretrained(tiny)
    for k, v in BIG_TEXT.items():
        setattr(config.text_config, k, v)
    head_dim = BIG_TEXT["hidden_size"] // BIG_TEXT["num_attention_heads"]
    config.text_config.rope_parameters["mrope_section"] = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]
    config.vision_config.out_hidden_size = BIG_TEXT["hidden_size"]
    config.text_config.layer_types = ["full_attention"] * BIG_TEXT["num_hidden_layers"]
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for f in tiny.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in ("config.json",):
            if not (out / f.name).exists():
                shutil.copy2(f, out / f.name)
    return out


def memcpy_seconds(state) -> float:
    t0 = time.perf_counter()
    copies = [t.clone() for t in state.values()]
    seconds = time.perf_counter() - t0
    del copies
    return seconds


def run(args: argparse.Namespace) -> int:
    from megatron_vr1.rollout.sglang_server import SGLangNotInstalled, SGLangServer, ServerSpec
    from megatron_vr1.weight_sync.buckets import MB, iter_safetensors, rebucket
    from megatron_vr1.weight_sync.disk import DiskTransport
    from megatron_vr1.weight_sync.distributed import DistributedTransport
    from megatron_vr1.weight_sync.syncer import WeightSyncer
    from megatron_vr1.weight_sync.tensor import TensorTransport

    work = Path(args.work_dir)
    model_dir = build_model(work / "model_1gb")
    state = dict(iter_safetensors(model_dir))
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    make = {"tensor": lambda: TensorTransport(device=args.device),
            "distributed": lambda: DistributedTransport(device=args.device, timeout_s=600.0),
            "disk": lambda: DiskTransport(root=work / "disk_versions", base_model_dir=model_dir, keep=1)}
    names = [n.strip() for n in args.transports.split(",") if n.strip()]
    unknown = [n for n in names if n not in make]
    if unknown:
        print(f"bench sync: unknown transport(s) {unknown}; choose from {sorted(make)}")
        return 2
    try:
        server = SGLangServer(ServerSpec(model_path=str(model_dir), device=args.device, log_dir=str(work / "logs"),
                                         max_total_tokens=1024, mem_fraction_static=0.3))
        t0 = time.perf_counter()
        server.start()
    except SGLangNotInstalled as e:
        print(f"bench sync: {e}")
        return 2
    startup = time.perf_counter() - t0
    rows = []
    try:
        version = 0
        for name in names:
            syncer = WeightSyncer([server.endpoint], make[name](), device=args.device)
            syncer.version = version
            walls, pushes = [], []
            for _ in range(args.repeats):
                rep = syncer.sync(lambda: rebucket(state.items(), args.bucket_mb * MB))
                walls.append(rep.seconds)
                pushes.append(rep.stats.seconds)
            version = syncer.version
            syncer.close()
            wall = statistics.median(walls)
            rows.append((name, wall, statistics.median(pushes), nbytes / 1e9 / wall, rep.stats.buckets))
        base = statistics.median(memcpy_seconds(state) for _ in range(3))
    finally:
        server.stop()
    print(f"\nbench sync: {nbytes / 1e9:.2f} GB float32 ({len(state)} tensors), {args.bucket_mb} MB buckets, "
          f"device={args.device}, median of {args.repeats}; server startup {startup:.0f} s")
    print(f"{'transport':<12} {'sync s':>8} {'push s':>8} {'GB/s':>7} {'buckets':>8} {'x memcpy':>9}")
    for name, wall, push, gbs, buckets in rows:
        print(f"{name:<12} {wall:>8.2f} {push:>8.2f} {gbs:>7.3f} {buckets:>8d} {wall / base:>9.1f}")
    print(f"{'memcpy':<12} {base:>8.2f} {base:>8.2f} {nbytes / 1e9 / base:>7.3f} {'-':>8} {1.0:>9.1f}")
    return 0
