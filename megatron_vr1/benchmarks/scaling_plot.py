"""Weak / strong scaling efficiency from the scaling CSV: a table on stdout and PNG plots (matplotlib, Agg).

Efficiency = tokens/s per device relative to the best run at the smallest device count of the same series
(same scaling kind, recipe, model, sequence length and device kind, and the same global batch for strong scaling
or the same batch per device for weak scaling). With a fixed global batch that equals T_base x n_base / (T x n);
with a fixed batch per device it equals T_base / T. 100% is perfect scaling.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from megatron_vr1.benchmarks.scaling_csv import ScalingRow


@dataclass(frozen=True, slots=True)
class Point:
    row: ScalingRow
    efficiency: float | None
    """Tokens/s per device over the series baseline's; None for a row shown on its own."""
    base_procs: int


def series_key(row: ScalingRow) -> tuple:
    per = row.global_batch if row.scaling == "strong" else row.global_batch / row.gpus_or_procs
    return (row.scaling, row.recipe, row.model, row.seq_len, row.device, per)


def latest(rows: list[ScalingRow]) -> list[ScalingRow]:
    """The last row of each (series, layout): a rerun replaces the earlier measurement in plots and tables."""
    keep: dict[tuple, ScalingRow] = {}
    for r in rows:
        keep[series_key(r) + (r.nodes, r.gpus_or_procs, r.tp, r.pp, r.dp)] = r
    return list(keep.values())


def efficiencies(rows: list[ScalingRow]) -> list[Point]:
    """Each row with its efficiency against its series' baseline, ordered by series then device count."""
    groups: dict[tuple, list[ScalingRow]] = defaultdict(list)
    for r in rows:
        groups[series_key(r)].append(r)
    out = []
    for key in sorted(groups, key=str):
        group = sorted(groups[key], key=lambda r: (r.gpus_or_procs, r.tp, r.pp))
        smallest = group[0].gpus_or_procs
        base = max(r.tokens_per_s_per_device for r in group if r.gpus_or_procs == smallest)
        out.extend(Point(r, r.tokens_per_s_per_device / base, smallest) for r in group)
    return out


def layout_name(r: ScalingRow) -> str:
    return f"{r.tp}x{r.pp}x{r.dp}"


def format_table(points: list[Point]) -> str:
    head = ["scaling", "nodes", "procs", "TPxPPxDP", "batch", "seq", "step s", "tokens/s", "tok/s/dev",
            "TFLOP/s/dev", "MFU", "export s", "rollout s", "efficiency"]
    rows = []
    for p in points:
        r = p.row
        rows.append([r.scaling, str(r.nodes), str(r.gpus_or_procs), layout_name(r), str(r.global_batch),
                     str(r.seq_len), f"{r.step_s_median:.3f}", f"{r.tokens_per_s:,.0f}",
                     f"{r.tokens_per_s_per_device:,.0f}", f"{r.model_tflops_per_device:.4g}", f"{100 * r.mfu:.1f}%",
                     f"{r.export_s:.3f}", "n/a" if r.rollout_s is None else f"{r.rollout_s:.2f}",
                     "-" if p.efficiency is None else f"{100 * p.efficiency:.0f}%"])
    widths = [max(len(x[i]) for x in rows + [head]) for i in range(len(head))]
    lines = [" | ".join(c.rjust(w) for c, w in zip(x, widths)) for x in [head, ["-" * w for w in widths]] + rows]
    return "\n".join(lines)


def write_plots(points: list[Point], out_dir: str | Path) -> list[Path]:
    """One PNG per scaling kind present: step time, total tokens/s (with the ideal line) and efficiency against
    the device count, every layout a labelled point, the best layout per device count joined by a line."""
    import matplotlib

    matplotlib.use("Agg", force=True)  # headless: never open a window
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for kind in ("strong", "weak"):
        pts = [p for p in points if p.row.scaling == kind]
        if not pts:
            continue
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        for key in sorted({series_key(p.row) for p in pts}, key=str):
            series = [p for p in pts if series_key(p.row) == key]
            r0 = series[0].row
            label = (f"{r0.recipe}, {r0.model}, seq {r0.seq_len}, "
                     + (f"batch {r0.global_batch}" if kind == "strong" else f"{key[-1]:g} seq/device"))
            best: dict[int, Point] = {}
            for p in series:
                n = p.row.gpus_or_procs
                if n not in best or p.row.tokens_per_s > best[n].row.tokens_per_s:
                    best[n] = p
            xs = sorted(best)
            base = series[0]
            for ax, get in zip(axes, (lambda p: p.row.step_s_median, lambda p: p.row.tokens_per_s,
                                      lambda p: 100 * p.efficiency)):
                (line,) = ax.plot(xs, [get(best[n]) for n in xs], marker="o", label=label)
                ax.scatter([p.row.gpus_or_procs for p in series], [get(p) for p in series], color=line.get_color(),
                           s=14)
                for p in series:
                    ax.annotate(layout_name(p.row), (p.row.gpus_or_procs, get(p)), fontsize=7,
                                textcoords="offset points", xytext=(4, 3))
            ideal = [base.row.tokens_per_s_per_device / base.efficiency * n for n in xs]
            axes[1].plot(xs, ideal, linestyle="--", color="grey", linewidth=1)
        axes[2].axhline(100, linestyle="--", color="grey", linewidth=1)
        device = pts[0].row.device
        for ax, title in zip(axes, ("step time (s, median)", "tokens/s (total; dashed: ideal)",
                                    "efficiency (% of tokens/s/device at the smallest count)")):
            ax.set_xlabel("processes (CPU)" if device.startswith("CPU") else "GPUs")
            ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3)
            ax.set_xticks(sorted({p.row.gpus_or_procs for p in pts}))
        axes[0].legend(fontsize=7)
        what = "fixed global batch" if kind == "strong" else "fixed batch per device"
        fig.suptitle(f"{kind} scaling ({what}) on {device}; labels: TPxPPxDP", fontsize=10)
        fig.tight_layout()
        path = out / f"scaling_{kind}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
