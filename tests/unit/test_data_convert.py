"""COCO / ODinW / RefCOCO converters, the paper's filters, and COCO -> rows -> COCO ground truth."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
from PIL import Image

from megatron_vr1.data import prompts
from megatron_vr1.data.check import check_rows
from megatron_vr1.data.coco import rows_to_coco_gt, write_jsonl
from megatron_vr1.data.converters import (RowFilter, coco_detection_rows, odinw_grounding_rows, refcoco_rows,
                                          select_rows)
from megatron_vr1.data.readers import open_rows, read_row

CATS = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"}]


@pytest.fixture()
def coco(tmp_path):
    images = [{"id": 11, "file_name": "a.png", "width": 64, "height": 48},
              {"id": 12, "file_name": "b.png", "width": 80, "height": 80},
              {"id": 13, "file_name": "c.png", "width": 30, "height": 40},
              {"id": 14, "file_name": "d.png", "width": 50, "height": 50}]
    anns = [
        {"id": 1, "image_id": 11, "category_id": 1, "bbox": [1.5, 2.25, 10.1, 20.7], "iscrowd": 0},
        {"id": 2, "image_id": 11, "category_id": 1, "bbox": [30.0, 5.0, 12.3, 30.0], "iscrowd": 0},
        {"id": 3, "image_id": 11, "category_id": 3, "bbox": [40.33, 20.0, 20.0, 11.9], "iscrowd": 0},
        {"id": 4, "image_id": 11, "category_id": 1, "bbox": [0, 0, 60, 40], "iscrowd": 1},
        {"id": 5, "image_id": 14, "category_id": 3, "bbox": [45.0, 10.0, 5.0, 5.0], "iscrowd": 0},
    ] + [{"id": 100 + k, "image_id": 12, "category_id": 18, "bbox": [k * 6.0, k * 5.5, 5.0, 5.0], "iscrowd": 0}
         for k in range(12)]
    for img in images:
        Image.new("RGB", (img["width"], img["height"]), (50, 60, 70)).save(tmp_path / img["file_name"])
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATS}))
    return path, anns


def _load_gt(gt, tmp_path):
    from pycocotools.coco import COCO

    (tmp_path / "gt.json").write_text(json.dumps(gt))
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(tmp_path / "gt.json"))


def test_coco_rows_round_trip_to_coco_gt_with_the_same_boxes(coco, tmp_path):
    path, anns = coco
    rows = coco_detection_rows(path, tmp_path, row_filter=RowFilter(min_instances=1, max_instances=30))
    assert [r.image.name for r in rows] == ["a.png", "b.png", "d.png"]  # c.png has no instance
    assert rows[0].problem == prompts.detection_prompt(["person", "car", "dog"])
    assert rows[0].num_instances == 3  # the crowd region is not an instance
    out = tmp_path / "rows" / "coco.jsonl"
    write_jsonl(rows, out)
    assert check_rows(out).ok
    source = open_rows(out)
    reread = [read_row(source, i) for i in range(len(source))]
    coco_gt = _load_gt(rows_to_coco_gt(reread), tmp_path)
    original = {(a["image_id"], a["category_id"]): [] for a in anns}
    for a in anns:
        if not a["iscrowd"]:
            original[(a["image_id"], a["category_id"])].append(a["bbox"])
    image_ids = {i + 1: orig for i, orig in enumerate([11, 12, 14])}
    assert sorted(c["id"] for c in coco_gt.loadCats(coco_gt.getCatIds())) == [1, 3, 18]
    n = 0
    for ann in coco_gt.loadAnns(coco_gt.getAnnIds()):
        want = original[(image_ids[ann["image_id"]], ann["category_id"])]
        assert any(all(abs(x - y) < 1e-9 for x, y in zip(ann["bbox"], b)) for b in want), ann
        n += 1
    assert n == sum(1 for a in anns if not a["iscrowd"])
    assert coco_gt.loadImgs(1)[0]["width"] == 64


def test_paper_filters_limits_hard_fraction_negatives(coco, tmp_path):
    path, _ = coco
    every = coco_detection_rows(path, tmp_path, row_filter=RowFilter(min_instances=0, max_instances=100,
                                                                      negative_ratio=1.0))
    assert sorted(r.num_instances for r in every) == [0, 1, 3, 12]
    assert [r.num_instances for r in select_rows(every, RowFilter(max_instances=10))] == [3, 1]
    hard = select_rows(every, RowFilter(hard_fraction=1.0))
    assert [r.num_instances for r in hard] == [12]
    mixed = select_rows(every, RowFilter(hard_fraction=0.5, seed=1))
    assert sorted(r.num_instances > 10 for r in mixed) == [False, True]
    with_neg = select_rows(every, RowFilter(negative_ratio=0.5))
    assert sorted(r.num_instances for r in with_neg) == [0, 1, 3, 12]
    assert select_rows(every, RowFilter(max_rows=2, seed=3)) == select_rows(every, RowFilter(max_rows=2, seed=3))
    with pytest.raises(ValueError, match="hard_fraction"):
        RowFilter(hard_fraction=1.5)


def test_odinw_grounding_one_row_per_present_category(coco, tmp_path):
    path, _ = coco
    rows = odinw_grounding_rows(path, tmp_path, template="griffon")
    keyed = [(r.image.name, r.problem, r.num_instances) for r in rows]
    assert keyed == [("a.png", prompts.grounding_prompt("person", "griffon"), 2),
                     ("a.png", prompts.grounding_prompt("car", "griffon"), 1),
                     ("b.png", prompts.grounding_prompt("dog", "griffon"), 12),
                     ("d.png", prompts.grounding_prompt("car", "griffon"), 1)]
    assert all({g.label for g in r.solution} <= set(r.target_id_maps) for r in rows)
    with_neg = odinw_grounding_rows(path, tmp_path, row_filter=RowFilter(negative_ratio=0.5))
    negatives = [r for r in with_neg if r.num_instances == 0]
    assert len(negatives) == 2 and all(r.solution == () for r in negatives)


def test_refcoco_rows_and_both_templates(coco, tmp_path):
    path, _ = coco
    refs = [{"ref_id": 1, "ann_id": 2, "image_id": 11, "split": "train",
             "sentences": [{"sent": "man on the right"}, {"sent": "tall person"}]},
            {"ref_id": 2, "ann_id": 5, "image_id": 14, "split": "val", "sentences": [{"sent": "red car"}]}]
    rows = refcoco_rows(path, refs, tmp_path, split="train", all_sentences=True)
    assert [r.problem for r in rows] == [prompts.rec_prompt("man on the right"), prompts.rec_prompt("tall person")]
    assert rows[0].solution[0].box == (30.0, 5.0, 42.3, 35.0) and rows[0].target_id_maps == {"man on the right": 1}
    griffon = refcoco_rows(path, refs, tmp_path, template="griffon", split="val")
    assert griffon[0].problem == ("Can you point out red car in the image and provide the coordinates of its "
                                  "location?")
    out = tmp_path / "rec.jsonl"
    write_jsonl(rows + griffon, out)
    assert check_rows(out).ok


def test_cli_coco_and_user_errors(coco, tmp_path, capsys):
    from megatron_vr1.cli import main

    path, _ = coco
    out = tmp_path / "cli.jsonl"
    assert main(["data", "coco", str(path), "--images", str(tmp_path), "--out", str(out), "--max-instances", "10"]) == 0
    assert len(out.read_text().splitlines()) == 2
    assert main(["data", "coco", str(path), "--images", str(tmp_path), "--out", str(tmp_path / "x.parquet")]) == 0
    assert check_rows(tmp_path / "x.parquet").ok
    (tmp_path / "broken.json").write_text("{\"images\": []")
    assert main(["data", "coco", str(tmp_path / "broken.json"), "--images", ".", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "broken.json" in err and "not valid JSON" in err and "Traceback" not in err


def test_category_id_zero_is_refused_with_a_fix(tmp_path):
    path = tmp_path / "odinw.json"
    path.write_text(json.dumps({"images": [], "annotations": [],
                                "categories": [{"id": 0, "name": "pistols"}, {"id": 1, "name": "pistol"}]}))
    with pytest.raises(ValueError, match="annotations_without_background"):
        odinw_grounding_rows(path, tmp_path)


def _py2_pickle(value) -> bytes:
    """``value`` pickled the way Python 2 wrote the refer toolkit's refs(unc).p: protocol 2, str as byte strings."""
    def enc(v) -> bytes:
        if isinstance(v, str):
            b = v.encode("utf-8")
            return b"U" + bytes([len(b)]) + b  # SHORT_BINSTRING: a Python 2 str
        if isinstance(v, int):
            return b"K" + bytes([v])  # BININT1
        if isinstance(v, list):
            return b"](" + b"".join(enc(x) for x in v) + b"e"
        return b"}(" + b"".join(enc(k) + enc(x) for k, x in v.items()) + b"u"
    return b"\x80\x02" + enc(value) + b"."


def test_cli_refcoco_reads_the_refer_toolkit_pickle_and_json(coco, tmp_path, capsys):
    import pickle
    from pathlib import Path

    from megatron_vr1.cli import main

    path, _ = coco
    refs = [{"ref_id": 1, "ann_id": 2, "image_id": 11, "split": "train", "category_id": 1,
             "sentences": [{"sent": "man on the right", "raw": "Man on the right."}, {"sent": "café sign"}]},
            {"ref_id": 2, "ann_id": 5, "image_id": 14, "split": "val", "sentences": [{"sent": "red car"}]}]
    (tmp_path / "refs(unc).p").write_bytes(_py2_pickle(refs))
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    outs = {}
    for name in ("refs(unc).p", "refs.json"):
        out = tmp_path / f"rec_{name}.jsonl"
        assert main(["data", "refcoco", str(path), "--refs", str(tmp_path / name), "--images", str(tmp_path),
                     "--out", str(out), "--split", "train", "--all-sentences"]) == 0
        assert check_rows(out).ok
        outs[name] = [json.loads(line) for line in out.read_text().splitlines()]
    assert outs["refs(unc).p"] == outs["refs.json"]
    assert [r["problem"] for r in outs["refs.json"]] == [prompts.rec_prompt("man on the right"),
                                                          prompts.rec_prompt("café sign")]
    assert json.loads(outs["refs.json"][0]["solution"]) == [["man on the right", [[30.0, 5.0, 42.3, 35.0]]]]
    capsys.readouterr()
    # A pickle that references any class or function is refused (it could run code), in one line.
    (tmp_path / "evil.p").write_bytes(pickle.dumps([{"ann_id": 2, "path": Path("x")}], protocol=2))
    (tmp_path / "dict.json").write_text(json.dumps({"refs": refs}))
    for name, needle in (("evil.p", "references pathlib"), ("dict.json", "expected a list of refs"),
                         ("missing.p", "no such refs file")):
        assert main(["data", "refcoco", str(path), "--refs", str(tmp_path / name), "--images", str(tmp_path),
                     "--out", str(tmp_path / "x.jsonl")]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err
