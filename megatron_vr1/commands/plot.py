"""``megatron-vr1 plot RUN_DIR``: PNG curves of a run's metrics.jsonl (matplotlib, Agg backend, no display)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PANELS = (("reward", ("reward/total", "reward/format", "reward/recall", "reward/precision")),
          ("loss", ("train/pg_loss", "train/nll", "train/kl_mean")),
          ("policy", ("train/entropy_mean", "train/clip_fraction", "train/logprob_gap_abs_mean")),
          ("rollout", ("rollout/length_mean", "rollout/truncated_frac")),
          ("speed", ("time/step_s", "throughput/tokens_per_s")))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="where to write the PNGs (default RUN_DIR/plots)")


def write_plots(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """One PNG per panel that has data; returns the written files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_vr1.training.metrics import read_metrics

    records = read_metrics(run_dir)
    out = Path(out_dir) if out_dir else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, keys in PANELS:
        series = {k: [(r["step"], r[k]) for r in records if isinstance(r.get(k), (int, float))] for k in keys}
        series = {k: v for k, v in series.items() if v}
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key, points in series.items():
            ax.plot([s for s, _ in points], [v for _, v in points], label=key, marker="." if len(points) < 50 else None)
        ax.set_xlabel("step")
        ax.set_title(f"{Path(run_dir).name}: {name}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def run(args: argparse.Namespace) -> int:
    try:
        paths = write_plots(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"megatron-vr1 plot: {e}", file=sys.stderr)
        return 2
    if not paths:
        print(f"megatron-vr1 plot: {args.run_dir}/metrics.jsonl has no plottable metrics", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0
