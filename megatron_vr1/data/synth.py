"""A procedural localization dataset with exact boxes, written as Vision-R1 rows + COCO ground truth.

Images hold 0..K solid shapes of several categories and colours on a noisy background, optionally with a
faint colour ramp (an absolute-position cue), partial occlusion and clutter (small marks that are not
objects). ``DIFFICULTIES`` are named knob sets: ``demo`` is what a 2M
model was found to learn on 2 CPU cores in minutes (56 px, 1-2 objects, corners on a 2 px grid, colour ramp);
``labels`` keeps that geometry but makes the labels harder (8 shapes, colour-qualified names), since the
RL stage should target what SFT leaves wrong; ``medium``/``hard`` add objects, occlusion and clutter.
Every image is drawn from its own seeded generator, so the output is deterministic and order-free.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from megatron_vr1.data import prompts
from megatron_vr1.data.coco import rows_to_coco_gt, write_jsonl
from megatron_vr1.data.schema import VisionR1Row
from megatron_vr1.types import GroundTruth

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "frame", "ring", "hexagon")
"""Every shape touches all four sides of its box, so the box is exact."""
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30),
          "purple": (140, 50, 180), "orange": (240, 130, 20), "cyan": (30, 200, 210), "magenta": (220, 50, 170)}


@dataclass(frozen=True, slots=True, kw_only=True)
class SynthConfig:
    """Difficulty knobs of the synthetic dataset."""

    image_size: int = 56
    min_objects: int = 1
    max_objects: int = 2
    num_shapes: int = 3
    """Categories used: the first ``num_shapes`` of SHAPES."""
    num_colors: int = 4
    color_labels: bool = False
    """Labels are "<colour> <shape>" (num_shapes * num_colors categories) instead of the shape."""
    class_colors: bool = False
    """Every shape of category k is drawn in colour k (needs num_colors >= num_shapes) instead of a random one."""
    min_size: float = 0.25
    max_size: float = 0.45
    """Object side as a fraction of the image side."""
    grid: int = 2
    """Box corners and sides snapped to this many pixels."""
    ramp: float = 40.0
    """Amplitude of the faint background colour ramp (0 = none)."""
    noise: int = 8
    max_overlap: float = 0.0
    """Largest IoU allowed between two objects; 0 keeps them apart, > 0 allows partial occlusion."""
    clutter: int = 0
    """Up to this many small distractor marks per image (never labelled)."""

    def __post_init__(self) -> None:
        checks = [
            (self.image_size % 28 == 0 and self.image_size >= 28, "image_size", "use a multiple of 28 (no resize)"),
            (0 <= self.min_objects <= self.max_objects <= 50, "min_objects", "use 0 <= min <= max_objects <= 50"),
            (1 <= self.num_shapes <= len(SHAPES), "num_shapes", f"use 1..{len(SHAPES)}"),
            (1 <= self.num_colors <= len(COLORS), "num_colors", f"use 1..{len(COLORS)}"),
            (0 < self.min_size <= self.max_size <= 1, "min_size", "use 0 < min_size <= max_size <= 1"),
            (self.grid >= 1 and 0 <= self.max_overlap < 1, "grid", "use grid >= 1 and 0 <= max_overlap < 1"),
            (not self.class_colors or (self.num_colors >= self.num_shapes and not self.color_labels), "class_colors",
             "use num_colors >= num_shapes and color_labels=False (one colour names one shape)"),
        ]
        for ok, name, fix in checks:
            if not ok:
                raise ValueError(f"synth {name}={getattr(self, name)!r} is invalid: {fix}")

    @property
    def categories(self) -> list[str]:
        shapes = SHAPES[: self.num_shapes]
        if not self.color_labels:
            return list(shapes)
        return [f"{c} {s}" for c in list(COLORS)[: self.num_colors] for s in shapes]


DIFFICULTIES: dict[str, SynthConfig] = {
    "demo": SynthConfig(class_colors=True),
    "shapes": SynthConfig(),
    "labels": SynthConfig(num_shapes=8, num_colors=4, color_labels=True),
    "easy": SynthConfig(image_size=112, min_objects=1, max_objects=3, min_size=0.2, max_size=0.42, grid=4),
    "medium": SynthConfig(image_size=112, min_objects=0, max_objects=5, num_shapes=5, num_colors=6, min_size=0.12,
                          max_size=0.35, grid=1, max_overlap=0.2, clutter=3),
    "hard": SynthConfig(image_size=224, min_objects=0, max_objects=12, num_shapes=8, num_colors=8, color_labels=True,
                        min_size=0.06, max_size=0.3, grid=1, ramp=0.0, noise=16, max_overlap=0.35, clutter=8),
}


def _iou(a, b) -> float:
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _draw(d: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], col, bg) -> None:
    x1, y1, x2, y2 = box[0], box[1], box[2] - 1, box[3] - 1  # PIL's ends are inclusive; boxes are exclusive
    cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
    if shape == "circle":
        d.ellipse([x1, y1, x2, y2], fill=col)
    elif shape == "square":
        d.rectangle([x1, y1, x2, y2], fill=col)
    elif shape == "triangle":
        d.polygon([(cx, y1), (x1, y2), (x2, y2)], fill=col)
    elif shape == "diamond":
        d.polygon([(cx, y1), (x2, cy), (cx, y2), (x1, cy)], fill=col)
    elif shape == "cross":
        d.rectangle([x1 + w / 3, y1, x2 - w / 3, y2], fill=col)
        d.rectangle([x1, y1 + h / 3, x2, y2 - h / 3], fill=col)
    elif shape == "frame":
        t = max(2, int(w) // 5)
        d.rectangle([x1, y1, x2, y2], outline=col, width=t)
    elif shape == "ring":
        d.ellipse([x1, y1, x2, y2], fill=col)
        d.ellipse([x1 + w / 4, y1 + h / 4, x2 - w / 4, y2 - h / 4], fill=bg)
    else:  # hexagon
        d.polygon([(x1 + w / 4, y1), (x2 - w / 4, y1), (x2, cy), (x2 - w / 4, y2), (x1 + w / 4, y2), (x1, cy)],
                  fill=col)


def make_image(cfg: SynthConfig, rng: np.random.Generator) -> tuple[Image.Image, list[tuple[str, tuple[int, ...]]]]:
    """One image and its objects as (label, (x1, y1, x2, y2)) sorted left to right."""
    s = cfg.image_size
    base = int(rng.integers(200, 247)) - cfg.ramp / 2
    arr = np.full((s, s, 3), base, np.float32)
    if cfg.ramp:
        r = np.arange(s, dtype=np.float32) / s * cfg.ramp
        arr[:, :, 0] += r[None, :]
        arr[:, :, 2] += r[:, None]
    arr = np.clip(arr + rng.integers(-cfg.noise, cfg.noise + 1, (s, s, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(arr)
    d = ImageDraw.Draw(im)
    bg = tuple(int(v) for v in arr[0, 0])
    colors = list(COLORS.items())[: cfg.num_colors]
    for _ in range(int(rng.integers(0, cfg.clutter + 1))):  # clutter first: objects are drawn over it
        x, y = (int(v) for v in rng.integers(0, s - 3, 2))
        d.line([(x, y), (x + int(rng.integers(2, 6)), y + int(rng.integers(-3, 4)))],
               fill=colors[int(rng.integers(len(colors)))][1], width=1)
    lo, hi = max(cfg.grid, int(s * cfg.min_size)), max(cfg.grid, int(s * cfg.max_size))
    objects: list[tuple[str, tuple[int, ...]]] = []
    for _ in range(int(rng.integers(cfg.min_objects, cfg.max_objects + 1))):
        for _try in range(50):
            w = int(rng.integers(lo, hi + 1)) // cfg.grid * cfg.grid
            h = w if rng.random() < 0.5 else int(np.clip(w * rng.uniform(0.7, 1.3), lo, hi)) // cfg.grid * cfg.grid
            x1 = int(rng.integers(0, s - w + 1)) // cfg.grid * cfg.grid
            y1 = int(rng.integers(0, s - h + 1)) // cfg.grid * cfg.grid
            box = (x1, y1, x1 + w, y1 + h)
            if all((_iou(box, o[1]) <= cfg.max_overlap if cfg.max_overlap else
                    box[2] <= o[1][0] - 2 or box[0] >= o[1][2] + 2 or box[3] <= o[1][1] - 2 or box[1] >= o[1][3] + 2)
                   for o in objects):
                break
        else:
            continue  # no room left; the image gets fewer objects
        k = int(rng.integers(cfg.num_shapes))
        shape = SHAPES[k]
        cname, col = colors[k] if cfg.class_colors else colors[int(rng.integers(len(colors)))]
        _draw(d, shape, box, col, bg)
        objects.append((f"{cname} {shape}" if cfg.color_labels else shape, box))
    objects.sort(key=lambda o: (o[1][0], o[1][1]))
    return im, objects


def generate_split(cfg: SynthConfig, out_dir: Path, split: str, n: int, seed: int,
                   template: prompts.PromptTemplate = "qwen25vl") -> list[VisionR1Row]:
    """Draw ``n`` images of ``split`` into out_dir/images/<split>/ and return their rows."""
    img_dir = out_dir / "images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    cats = cfg.categories
    id_maps = {c: i + 1 for i, c in enumerate(cats)}
    problem = prompts.detection_prompt(cats, template)
    split_key = {"train": 0, "val": 1}.get(split, sum(map(ord, split)))
    rows = []
    for i in range(n):
        im, objects = make_image(cfg, np.random.default_rng([seed, split_key, i]))
        path = img_dir / f"{i:06d}.png"
        im.save(path, compress_level=1)  # noisy images barely compress; level 1 halves the time
        sol = tuple(GroundTruth(label=label, box=tuple(float(v) for v in box)) for label, box in objects)
        rows.append(VisionR1Row(problem=problem, image=path, solution=sol, width=cfg.image_size,
                                height=cfg.image_size, num_instances=len(sol), target_id_maps=id_maps,
                                source=f"synth-{split}"))
    return rows


def build_synth(out_dir: str | Path, *, n: int, seed: int = 0, difficulty: str = "demo", n_val: int | None = None,
                template: prompts.PromptTemplate = "qwen25vl", **overrides) -> dict[str, Path]:
    """Write train/val rows (``<split>.jsonl``), COCO GT (``<split>_gt.json``, the names the demo recipe
    reads) and ``synth_config.json``; returns the paths by key (train, val, train_gt, val_gt)."""
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty={difficulty!r} is unknown: use one of {sorted(DIFFICULTIES)}")
    if n < 1:
        raise ValueError(f"n={n} is invalid: generate at least one training image")
    cfg = replace(DIFFICULTIES[difficulty], **overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for split, count in (("train", n), ("val", max(1, n // 10) if n_val is None else n_val)):
        rows = generate_split(cfg, out, split, count, seed, template)
        paths[split] = out / f"{split}.jsonl"
        write_jsonl(rows, paths[split])
        gt = rows_to_coco_gt(rows, file_names=[f"images/{split}/{i:06d}.png" for i in range(count)])
        paths[f"{split}_gt"] = out / f"{split}_gt.json"
        paths[f"{split}_gt"].write_text(json.dumps(gt))
    (out / "synth_config.json").write_text(json.dumps({"difficulty": difficulty, "seed": seed, "n": n,
                                                        "template": template, **asdict(cfg)}, indent=1))
    return paths
