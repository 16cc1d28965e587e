"""PNG figures of an evaluation (matplotlib, Agg backend): precision-recall curves and an image grid with
predicted (red, dashed) and ground-truth (green) boxes in original-image pixels."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_vr1.eval.coco_metrics import CocoMetrics


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # headless: never open a window, also under a display
    import matplotlib.pyplot as plt

    return plt


def plot_pr_curves(results: Sequence[tuple[str, CocoMetrics]], path: str | os.PathLike) -> Path:
    """One panel per IoU setting (0.50, 0.75, 0.50:0.95), one curve per dataset: category-averaged precision at
    each of COCO's 101 recall thresholds (area all, maxDets 100)."""
    plt = _pyplot()
    keys = ("0.50", "0.75", "0.50:0.95")
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, m in results:
            ap = m.stats["AP50"] if key == "0.50" else m.stats["AP75"] if key == "0.75" else m.stats["AP"]
            ax.plot(m.recall_thresholds, m.precision_at_iou.get(key, []), label=f"{name} (AP {100 * max(ap, 0):.1f})")
        ax.set_title(f"precision-recall, IoU {key}")
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_image_grid(items: Sequence[dict[str, Any]], path: str | os.PathLike, *, columns: int = 4) -> Path:
    """A grid of images. Each item: ``image`` (path), ``title``, ``gt`` and ``pred`` lists of (label, [x, y, w, h])
    in original pixels. Unreadable images are drawn as an empty panel with a note (the figure never fails)."""
    from PIL import Image

    plt = _pyplot()
    n = max(1, len(items))
    cols = min(columns, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, item in zip(axes.flat, items):
        try:
            with Image.open(item["image"]) as im:
                ax.imshow(im.convert("RGB"))
        except (OSError, ValueError) as e:
            ax.text(0.5, 0.5, f"image unreadable:\n{type(e).__name__}", ha="center", va="center", fontsize=7,
                    transform=ax.transAxes)
        for boxes, color, style in ((item.get("gt", []), "lime", "-"), (item.get("pred", []), "red", "--")):
            for label, (x, y, w, h) in boxes:
                ax.add_patch(plt.Rectangle((x, y), w, h, fill=False, edgecolor=color, linestyle=style, linewidth=1.2))
                ax.text(x, y, str(label)[:20], color=color, fontsize=6, va="bottom")
        ax.set_title(str(item.get("title", ""))[:40], fontsize=7)
    fig.suptitle("green: ground truth, red dashed: predictions", fontsize=8)
    # fixed margins: layout engines warn (and may collapse axes) for small grids with long titles
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.88, wspace=0.08, hspace=0.25)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def grid_items(gt: dict[str, Any], detections: Sequence[dict[str, Any]], images: dict[int, str],
               max_images: int = 16) -> list[dict[str, Any]]:
    """Items for ``plot_image_grid`` from a COCO GT, its detections and image id -> path (first N images)."""
    names = {c["id"]: c["name"] for c in gt["categories"]}
    items = []
    for image_id, path in list(images.items())[:max_images]:
        items.append({
            "image": path, "title": f"id {image_id}: {Path(path).name}",
            "gt": [(names[a["category_id"]], a["bbox"]) for a in gt["annotations"] if a["image_id"] == image_id],
            "pred": [(names[d["category_id"]], d["bbox"]) for d in detections if d["image_id"] == image_id],
        })
    return items
