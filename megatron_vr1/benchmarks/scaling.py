"""``megatron-vr1 bench scaling``: step time, tokens/s per device, MFU and weight-export time of a recipe across
node counts and TP / PP / DP layouts, collected into one CSV, and weak / strong scaling plots from it.

Three modes:

* measure (default): one layout in the current world (torchrun, Slurm tasks, or a plain process = a world of
  one), one CSV row on rank 0 (``scaling_measure``). ``examples/slurm/scaling_bench.sbatch`` runs it as a job
  array over node counts and layouts.
* ``--local-sweep``: relaunches the measure mode under torchrun on this host's CPU (gloo) over small layouts,
  for strong (fixed global batch) and weak (fixed batch per process) scaling, then plots (``scaling_sweep``).
* ``--plot``: reads the CSV, prints the table with efficiencies, writes ``scaling_{strong,weak}.png``.

The baseline of every efficiency is the smallest device count of the same series in the same CSV.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", default="tiny_cpu_demo", help="built-in recipe or path/to/file.py:function "
                        "(default: tiny_cpu_demo)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="recipe override, repeatable")
    parser.add_argument("--model", default=None, help="Hugging Face model directory, or 'tiny' for a random "
                        "~2M-parameter Qwen2.5-VL built under --work-dir (default: the recipe's model.hf_path)")
    parser.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default: the recipe's)")
    parser.add_argument("--pp", type=int, default=None, help="pipeline-parallel size (default: the recipe's)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps; the row reports the median")
    parser.add_argument("--warmup", type=int, default=1)
    batch = parser.add_mutually_exclusive_group()
    batch.add_argument("--global-batch", type=int, default=None, help="strong scaling: sequences per step "
                       "(default: the recipe's prompts_per_step x num_generations)")
    batch.add_argument("--batch-per-proc", type=int, default=None,
                       help="weak scaling: sequences per step per process (global batch = this x world size)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: an image at the "
                        "recipe's max_pixels + a 64-token prompt + max_new_tokens)")
    parser.add_argument("--csv", default="runs/scaling/results.csv", help="the CSV rows are appended to")
    parser.add_argument("--work-dir", default="runs/bench_scaling", help="where --model tiny is built")
    parser.add_argument("--peak-tflops", type=float, default=None, help="per-device peak for MFU (default: the "
                        "datasheet dense bf16 peak of known GPUs; on CPU a matmul measured in each process)")
    parser.add_argument("--rollout", choices=["none", "hf"], default="none", help="hf: also time one rollout-sized "
                        "generation with the in-process transformers engine on rank 0 (default none: rollout_s empty, "
                        "SGLang's decode is benchmarked elsewhere)")
    parser.add_argument("--local-sweep", action="store_true", help="run --layouts x --modes under torchrun on this "
                        "host's CPU, then plot")
    parser.add_argument("--layouts", default=None, help="--local-sweep: world:tp:pp list (default 1:1:1,2:1:1,"
                        "2:2:1,2:1:2)")
    parser.add_argument("--modes", default="strong,weak", help="--local-sweep: strong, weak or strong,weak")
    parser.add_argument("--plot", action="store_true", help="print the CSV's table and write the PNG plots")
    parser.add_argument("--plot-dir", default=None, help="where the PNGs go (default: next to the CSV)")


def _fail(message: str) -> int:
    print(f"megatron-vr1 bench scaling: {message}", file=sys.stderr)
    return 2


def plot(csv: str, plot_dir: str | None) -> int:
    from megatron_vr1.benchmarks.scaling_csv import ScalingCSVError, read_rows
    from megatron_vr1.benchmarks.scaling_plot import efficiencies, format_table, latest, write_plots

    try:
        rows = read_rows(csv)
    except ScalingCSVError as e:
        return _fail(str(e))
    if not rows:
        return _fail(f"{csv} has a header but no rows; run a measurement first")
    points = efficiencies(latest(rows))
    print(format_table(points))
    devices = {p.row.device for p in points}
    if any(d.startswith("CPU") for d in devices):
        print("These rows are CPU processes (gloo), not GPUs: on a host with few cores, worlds beyond the core "
              "count measure oversubscription, and other jobs on the host add noise.")
    for path in write_plots(points, plot_dir or Path(csv).parent):
        print(f"wrote {path}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from megatron_vr1.benchmarks.scaling_sweep import DEFAULT_LAYOUTS, SweepSpec, parse_layouts, run_sweep

    if args.tp or args.pp:
        return _fail("--tp / --pp pick one layout of the measure mode; with --local-sweep pass --layouts "
                     "world:tp:pp,... instead")
    try:
        spec = SweepSpec(layouts=parse_layouts(args.layouts or DEFAULT_LAYOUTS),
                         modes=tuple(m.strip() for m in args.modes.split(",") if m.strip()), recipe=args.recipe,
                         model=args.model or "tiny", global_batch=args.global_batch or 16,
                         batch_per_proc=args.batch_per_proc or 8, steps=args.steps, warmup=args.warmup, csv=args.csv,
                         work_dir=args.work_dir, overrides=tuple(args.overrides),
                         rollout=args.rollout)
    except ValueError as e:
        return _fail(str(e))
    rc = run_sweep(spec)
    return rc or plot(args.csv, args.plot_dir)


def run(args: argparse.Namespace) -> int:
    if args.local_sweep:
        return _sweep(args)
    if args.plot:
        return plot(args.csv, args.plot_dir)
    from megatron_vr1.benchmarks.scaling_csv import ScalingCSVError, append_row
    from megatron_vr1.benchmarks.scaling_measure import MeasureSpec, measure
    from megatron_vr1.config.base import ConfigError

    try:
        spec = MeasureSpec(recipe=args.recipe, overrides=tuple(args.overrides), model=args.model, tp=args.tp,
                           pp=args.pp, steps=args.steps, warmup=args.warmup, global_batch=args.global_batch,
                           batch_per_proc=args.batch_per_proc, seq=args.seq, csv=args.csv, work_dir=args.work_dir,
                           peak_tflops=args.peak_tflops, rollout=args.rollout)
        row = measure(spec)
        if row is not None:
            append_row(spec.csv, row)
    except (ValueError, ConfigError, ScalingCSVError, FileNotFoundError) as e:
        return _fail(str(e))
    if row is not None:
        from megatron_vr1.benchmarks.scaling_plot import Point, format_table

        print(format_table([Point(row, None, row.gpus_or_procs)]))
        print(f"appended to {spec.csv} ({row.device}; peak {row.peak_tflops_per_device:.3g} TFLOP/s/device from "
              f"{row.peak_source}); {row.note}")
    return 0
