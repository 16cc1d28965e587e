"""``megatron-vr1 convert``: HF <-> Megatron checkpoints and a logit check between them.

  convert hf-to-mcore --hf DIR --out DIR [--tp N --pp M] [--dtype D]   torch_dist checkpoint, loads at any TP/PP
  convert mcore-to-hf --ckpt DIR --hf-config DIR --out DIR            safetensors shards + index + config/tokenizer
  convert verify --hf DIR --ckpt DIR [--tp N --pp M] [--dtype D] [--tolerance T]
                                                                      relative logit error; exit 1 above T

``verify`` with TP*PP > 1 relaunches itself under torchrun with TP*PP processes when not already under one.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def _size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for unit, mult in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from megatron_vr1.convert.verify import DEFAULT_TOLERANCE, VERIFY_DTYPES  # torch-free: --help stays instant

    sub = parser.add_subparsers(dest="convert_action", metavar="<action>", required=True)
    h2m = sub.add_parser("hf-to-mcore", help="HF safetensors -> Megatron torch_dist checkpoint")
    h2m.add_argument("--hf", required=True, help="HF checkpoint directory (config.json + *.safetensors)")
    h2m.add_argument("--out", required=True, help="new directory for the torch_dist checkpoint")
    h2m.add_argument("--tp", type=int, default=1, help="tensor-parallel size to pad the vocabulary for (default 1)")
    h2m.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to check the layer count against")
    _uneven_stage_arguments(h2m)
    h2m.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                     help="parameter dtype of the checkpoint (default: the HF checkpoint's)")
    m2h = sub.add_parser("mcore-to-hf", help="Megatron torch_dist checkpoint -> HF safetensors directory")
    m2h.add_argument("--ckpt", required=True, help="torch_dist checkpoint directory")
    m2h.add_argument("--hf-config", required=True,
                     help="the reference HF directory: config.json, tokenizer and processor files are copied from it")
    m2h.add_argument("--out", required=True, help="new directory for the HF checkpoint")
    m2h.add_argument("--max-shard-size", type=_size, default=5 * 2**30, help="e.g. 5GB (default 5 GiB)")
    ver = sub.add_parser(
        "verify", help="compare HF and Megatron logits on an image+text prompt",
        description="Run one image+text prompt through the HF model and the converted Megatron model and compare "
                    "the logits. Exit 0 when the relative error max |logit diff| / max |HF logit| is within the "
                    "tolerance, 1 above it, 2 on a usage error.")
    ver.add_argument("--hf", required=True, help="HF checkpoint directory")
    ver.add_argument("--ckpt", required=True, help="torch_dist checkpoint directory")
    ver.add_argument("--tp", type=int, default=1, help="tensor-parallel size to load the checkpoint at (default 1)")
    ver.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to load the checkpoint at (default 1)")
    _uneven_stage_arguments(ver)
    ver.add_argument("--dtype", choices=list(VERIFY_DTYPES), default="float32",
                     help="dtype both models are loaded and run in. float32 (default): bf16/fp16 weights are upcast "
                          "exactly, so a correct conversion agrees to fp32 rounding whatever the checkpoint's dtype. "
                          "bfloat16, or checkpoint (the checkpoint's own dtype), for machines without the memory for "
                          "fp32 copies: rounding alone then differs by ~1e-2 of the logit scale, so the default "
                          "tolerance is looser")
    defaults = ", ".join(f"{v:.0e} at {k}" for k, v in DEFAULT_TOLERANCE.items())
    ver.add_argument("--tolerance", type=float, default=None, metavar="REL",
                     help=f"max relative logit error allowed, max |Megatron - HF| / max |HF logit| (default: "
                          f"{defaults}, by the --dtype compared in)")


def _uneven_stage_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pp-first", type=int, default=0, metavar="LAYERS",
                        help="decoder layers on the first pipeline stage (default 0: an even split; the trainer's "
                             "parallel.pipeline_first_stage_layers)")
    parser.add_argument("--pp-last", type=int, default=0, metavar="LAYERS",
                        help="decoder layers on the last pipeline stage (default 0: an even split)")


def _relaunch_under_torchrun(args: argparse.Namespace) -> int:
    from megatron_vr1.parallel.env import free_port

    n = args.tp * args.pp
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "megatron_vr1.cli", "convert", "verify", "--hf", args.hf,
           "--ckpt", args.ckpt, "--tp", str(args.tp), "--pp", str(args.pp), "--pp-first", str(args.pp_first),
           "--pp-last", str(args.pp_last), "--dtype", args.dtype]
    if args.tolerance is not None:
        cmd += ["--tolerance", repr(args.tolerance)]
    return subprocess.run(cmd).returncode


def _dispatch(args: argparse.Namespace) -> int:
    if args.convert_action == "hf-to-mcore":
        from megatron_vr1.convert.hf_to_mcore import convert_hf_to_mcore

        report = convert_hf_to_mcore(args.hf, args.out, tp=args.tp, pp=args.pp, dtype=args.dtype,
                                     pp_first=args.pp_first, pp_last=args.pp_last)
        print(f"wrote {args.out}: {report.summary()}")
        return 0
    if args.convert_action == "mcore-to-hf":
        from megatron_vr1.convert.mcore_to_hf import convert_mcore_to_hf

        report = convert_mcore_to_hf(args.ckpt, args.hf_config, args.out, max_shard_bytes=args.max_shard_size)
        print(f"wrote {args.out}: {report.summary()}")
        return 0
    if args.tp * args.pp > 1 and "WORLD_SIZE" not in os.environ:
        from megatron_vr1.convert.arch import load_config
        from megatron_vr1.convert.session import check_layout

        check_layout(load_config(args.hf), args.tp, args.pp, args.pp_first, args.pp_last)  # one error, not N ranks'
        return _relaunch_under_torchrun(args)
    from megatron_vr1.convert.verify import verify

    result = verify(args.hf, args.ckpt, tp=args.tp, pp=args.pp, dtype=args.dtype, tolerance=args.tolerance,
                    pp_first=args.pp_first, pp_last=args.pp_last)
    if result is None:  # not global rank 0
        return 0
    print(f"convert verify (TP={args.tp}, PP={args.pp}): {result.summary()}")
    return 0 if result.ok else 1


def run(args: argparse.Namespace) -> int:
    from megatron_vr1.config.base import ConfigError
    from megatron_vr1.convert.errors import ConversionError

    try:
        return _dispatch(args)
    except (ConversionError, ConfigError, FileNotFoundError, NotADirectoryError) as e:
        print(f"megatron-vr1 convert {args.convert_action}: {e}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            from megatron_vr1.parallel import state

            state.destroy()
