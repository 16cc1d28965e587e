"""The synthetic localization dataset: deterministic, exact boxes, valid rows and COCO ground truth."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from megatron_vr1.data.check import check_rows
from megatron_vr1.data.readers import open_rows, read_row
from megatron_vr1.data.synth import DIFFICULTIES, SynthConfig, build_synth, make_image


def test_synth_is_deterministic_and_valid(tmp_path):
    a = build_synth(tmp_path / "a", n=40, seed=3, difficulty="demo")
    b = build_synth(tmp_path / "b", n=40, seed=3, difficulty="demo")
    c = build_synth(tmp_path / "c", n=40, seed=4, difficulty="demo")
    for key in ("train", "val", "train_gt", "val_gt"):
        assert a[key].read_bytes() == b[key].read_bytes(), key
    assert (tmp_path / "a/images/train/000007.png").read_bytes() == (tmp_path / "b/images/train/000007.png").read_bytes()
    assert a["train_gt"].read_bytes() != c["train_gt"].read_bytes()
    assert len(a["val"].read_text().splitlines()) == 4
    report = check_rows(a["train"])
    assert report.ok and report.rows == 40


def test_coco_gt_matches_rows_and_loads_in_pycocotools(tmp_path):
    from pycocotools.coco import COCO

    paths = build_synth(tmp_path, n=30, seed=0, difficulty="medium")
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(paths["train_gt"]))
    source = open_rows(paths["train"])
    rows = [read_row(source, i) for i in range(len(source))]
    names = {c["id"]: c["name"] for c in gt.loadCats(gt.getCatIds())}
    for i, row in enumerate(rows):
        anns = gt.loadAnns(gt.getAnnIds(imgIds=[i + 1]))
        got = sorted((names[a["category_id"]], tuple(a["bbox"])) for a in anns)
        want = sorted((g.label, (g.box[0], g.box[1], g.box[2] - g.box[0], g.box[3] - g.box[1])) for g in row.solution)
        assert got == want
    counts = [r.num_instances for r in rows]
    assert min(counts) == 0 and max(counts) > 2  # medium draws counts 0..K


@pytest.mark.parametrize("difficulty", sorted(DIFFICULTIES))
def test_boxes_are_the_exact_extent_of_each_drawing(difficulty):
    cfg = DIFFICULTIES[difficulty]
    from dataclasses import replace

    cfg = replace(cfg, clutter=0, max_overlap=0.0, noise=0, ramp=0.0)  # isolate shapes on a flat background
    rng = np.random.default_rng(11)
    for _ in range(10):
        image, objects = make_image(cfg, rng)
        arr = np.asarray(image).astype(int)
        background = arr[0, 0]
        fg = np.abs(arr - background).sum(-1) > 0
        for _label, (x1, y1, x2, y2) in objects:
            region = fg[y1:y2, x1:x2]
            assert region[0].any() and region[-1].any() and region[:, 0].any() and region[:, -1].any()
        covered = np.zeros_like(fg)
        for _label, (x1, y1, x2, y2) in objects:
            covered[y1:y2, x1:x2] = True
        assert not (fg & ~covered).any()  # nothing drawn outside the boxes


def test_difficulty_knobs(tmp_path):
    labels = DIFFICULTIES["labels"]
    assert len(labels.categories) == 32 and labels.image_size == 56
    demo = DIFFICULTIES["demo"]
    assert (demo.image_size, demo.min_objects, demo.max_objects, demo.grid) == (56, 1, 2, 2)
    rng = np.random.default_rng(0)
    for _ in range(20):
        _, objects = make_image(demo, rng)
        assert 1 <= len(objects) <= 2 and all(v % 2 == 0 for _, box in objects for v in box)
    paths = build_synth(tmp_path, n=5, seed=0, difficulty="hard", n_val=2)
    row = json.loads(paths["train"].read_text().splitlines()[0])
    assert Image.open(tmp_path / row["image"]).size == (224, 224)
    with pytest.raises(ValueError, match="image_size"):
        SynthConfig(image_size=50)
    with pytest.raises(ValueError, match="difficulty"):
        build_synth(tmp_path, n=1, difficulty="impossible")


def test_demo_draws_each_category_in_its_own_colour():
    from megatron_vr1.data.synth import COLORS, SHAPES

    demo, shapes = DIFFICULTIES["demo"], DIFFICULTIES["shapes"]
    assert demo.class_colors and not shapes.class_colors and demo.categories == shapes.categories
    palette = list(COLORS.values())
    seen: dict[str, set] = {}
    for cfg in (demo, shapes):
        rng = np.random.default_rng(1)
        for _ in range(40):
            im, objects = make_image(cfg, rng)
            arr = np.asarray(im)
            for label, (x1, y1, x2, y2) in objects:
                centre = tuple(int(v) for v in arr[(y1 + y2) // 2, (x1 + x2) // 2])  # every shape covers its centre
                seen.setdefault(f"{cfg is demo}-{label}", set()).add(centre)
    for label in demo.categories:  # the demo: one colour per shape, the shape's index in the palette
        assert seen[f"True-{label}"] == {palette[SHAPES.index(label)]}, label
    assert any(len(seen[f"False-{label}"]) > 1 for label in shapes.categories)  # shapes: random colours
    with pytest.raises(ValueError, match="class_colors"):
        SynthConfig(class_colors=True, num_shapes=5, num_colors=4)


def test_cli_synth(tmp_path, capsys):
    from megatron_vr1.cli import main

    assert main(["data", "synth", "--out", str(tmp_path), "--n", "6", "--seed", "1", "--difficulty", "labels"]) == 0
    assert (tmp_path / "train_gt.json").exists() and (tmp_path / "val.jsonl").exists()
    assert main(["data", "synth", "--out", str(tmp_path), "--n", "0"]) == 2
    assert "n=0" in capsys.readouterr().err
