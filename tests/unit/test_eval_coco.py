"""COCO metrics (faster-coco-eval) against pycocotools, and the coco-eval command's handling of bad input."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

from megatron_vr1.cli import main
from megatron_vr1.eval.coco_metrics import (STAT_KEYS, CocoInputError, coco_metrics, validate_detections,
                                            validate_ground_truth)


def make_coco(n_images: int, boxes_per_image: int, n_cats: int = 4, seed: int = 0):
    """Random GT (boxes of every COCO area range) and noisy detections: some shifted, some wrong-class, some
    spurious, with random scores (so ranking, area ranges and maxDets all matter)."""
    rng = np.random.default_rng(seed)
    images = [{"id": i + 1, "width": 640, "height": 480, "file_name": f"{i + 1}.jpg"} for i in range(n_images)]
    cats = [{"id": 10 + c, "name": f"Cat{c}"} for c in range(n_cats)]
    anns, dets = [], []
    for i in range(n_images):
        for _ in range(boxes_per_image):
            side = float(rng.choice([12.0, 60.0, 200.0]))  # small / medium / large
            w, h = side * rng.uniform(0.6, 1.4), side * rng.uniform(0.6, 1.4)
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            cid = 10 + int(rng.integers(n_cats))
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cid, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": 0})
            jitter = rng.normal(0, 0.1 * side, 4)
            if rng.random() < 0.85:
                dets.append({"image_id": i + 1, "category_id": cid if rng.random() < 0.8 else 10 + int(rng.integers(n_cats)),
                             "bbox": [x + jitter[0], y + jitter[1], max(1.0, w + jitter[2]), max(1.0, h + jitter[3])],
                             "score": float(rng.random())})
            if rng.random() < 0.3:
                dets.append({"image_id": i + 1, "category_id": 10 + int(rng.integers(n_cats)),
                             "bbox": [rng.uniform(0, 500), rng.uniform(0, 400), 30.0, 30.0], "score": float(rng.random())})
    return {"images": images, "annotations": anns, "categories": cats}, dets


def pycocotools_stats(gt: dict, dets: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = json.loads(json.dumps(gt))
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(json.loads(json.dumps(dets)))
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats), np.asarray(ev.eval["precision"])


@pytest.mark.parametrize("seed,n_images,per_image", [(0, 40, 10), (1, 7, 30), (2, 60, 3)])
def test_stats_equal_pycocotools(seed, n_images, per_image):
    gt, dets = make_coco(n_images, per_image, seed=seed)
    gt = validate_ground_truth(gt)
    dets = validate_detections(dets, gt)
    ours = coco_metrics(gt, dets)
    ref_stats, ref_precision = pycocotools_stats(gt, dets)
    assert list(ours.stats) == list(STAT_KEYS)
    np.testing.assert_allclose([ours.stats[k] for k in STAT_KEYS], ref_stats, rtol=0, atol=1e-12)
    assert 0.0 < ours.stats["AP"] < 1.0  # a non-trivial case, not all zeros
    # Per-category AP = pycocotools' precision averaged over IoU x recall for that category.
    for k, row in enumerate(ours.per_category):
        p = ref_precision[:, :, k, 0, -1]
        expected = p[p > -1].mean() if (p > -1).any() else -1.0
        assert row["AP"] == pytest.approx(expected, abs=1e-12)


def test_empty_detections_score_zero():
    gt, _ = make_coco(3, 2)
    m = coco_metrics(validate_ground_truth(gt), [])
    assert m.stats["AP"] == 0.0 and m.stats["AR100"] == 0.0


def test_missing_area_and_iscrowd_are_filled():
    gt, dets = make_coco(5, 4, seed=3)
    for a in gt["annotations"]:
        del a["area"], a["iscrowd"]
    norm = validate_ground_truth(gt)
    assert all(a["area"] == a["bbox"][2] * a["bbox"][3] and a["iscrowd"] == 0 for a in norm["annotations"])
    assert coco_metrics(norm, validate_detections(dets, norm)).stats["AP"] > 0


@pytest.mark.parametrize("mutate,needle", [
    (lambda gt, d: gt.pop("categories"), "'categories'"),
    (lambda gt, d: gt["annotations"][2].update(bbox=[1, 2, 3]), "annotations[2]: field 'bbox'"),
    (lambda gt, d: gt["annotations"][1].update(image_id=999), "annotations[1]: field 'image_id'=999"),
    (lambda gt, d: d[3].update(score="high"), "row 3: field 'score'"),
    (lambda gt, d: d[0].update(category_id=77), "row 0: field 'category_id'=77"),
    (lambda gt, d: d[5].update(bbox=[0, 0, -4, 5]), "row 5: field 'bbox' has a negative width"),
    (lambda gt, d: d[2].pop("image_id"), "row 2: field 'image_id'=None"),
])
def test_malformed_inputs_name_row_and_field(mutate, needle):
    gt, dets = make_coco(4, 3, seed=5)
    mutate(gt, dets)
    with pytest.raises(CocoInputError) as exc:
        norm = validate_ground_truth(gt, source="GT.json")
        validate_detections(dets, norm, source="DT.json")
    assert needle in str(exc.value)


def test_cli_writes_metrics_json(tmp_path, capsys):
    gt, dets = make_coco(20, 5, seed=7)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(dets))
    rc = main(["coco-eval", "--gt", str(tmp_path / "gt.json"), "--dt", str(tmp_path / "dt.json"),
               "--out", str(tmp_path / "m" / "metrics.json")])
    assert rc == 0
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    ref_stats, _ = pycocotools_stats(validate_ground_truth(gt), dets)
    np.testing.assert_allclose([metrics[k] for k in STAT_KEYS], ref_stats, atol=1e-12)
    assert [r["name"] for r in metrics["per_category"]] == ["Cat0", "Cat1", "Cat2", "Cat3"]
    assert "| Cat0 |" in capsys.readouterr().out


@pytest.mark.parametrize("gt_text,dt_text,needle", [
    ("{not json", "[]", "gt.json is not valid JSON"),
    (None, '{"a": 1}', "top level must be a list of detections"),
    (None, '[{"image_id": 1, "category_id": 10, "bbox": [0, 0, 5, 5]}]', "row 0: field 'score'"),
    (None, None, "dt.json does not exist"),
])
def test_cli_bad_input_is_one_line_not_traceback(tmp_path, capsys, gt_text, dt_text, needle):
    gt, _ = make_coco(2, 2)
    (tmp_path / "gt.json").write_text(gt_text if gt_text is not None else json.dumps(gt))
    if dt_text is not None:
        (tmp_path / "dt.json").write_text(dt_text)
    rc = main(["coco-eval", "--gt", str(tmp_path / "gt.json"), "--dt", str(tmp_path / "dt.json")])
    err = capsys.readouterr().err
    assert rc == 2
    assert needle in err and "Traceback" not in err
