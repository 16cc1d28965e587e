"""``megatron-vr1 eval`` end to end with the real HFEngine on tiny Qwen2.5-VL checkpoints.

* A random model answers garbage: every answer must be counted unparsable, nothing crashes, all outputs exist.
* A model overfit (here, in a few seconds of CPU training) to always answer one fixed JSON gives known
  detections, so the whole chain (prompting, generation, parsing, rescaling to original pixels, label mapping,
  COCO metrics) is checked against pycocotools on hand-computed detections.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_vr1.cli import main
from megatron_vr1.data.tiny_model import build_tiny_model
from megatron_vr1.eval.queries import COCO_PROMPT, GROUNDING_PROMPT

pytestmark = [pytest.mark.slow, pytest.mark.integration]

# Fixed answer in *input* pixels (56x56: the 112x112 images are resized with --max-pixels 3136).
ANSWER = ('```json\n[\n\t{"bbox_2d": [10, 10, 30, 30], "label": "circle"},\n\t'
          '{"bbox_2d": [5, 30, 20, 50], "label": "square"}\n]\n```')
# The same boxes in original pixels (x2), COCO xywh.
CIRCLE, SQUARE = [20.0, 20.0, 40.0, 40.0], [10.0, 60.0, 30.0, 40.0]
PIXELS = ["--min-pixels", "784", "--max-pixels", "3136"]


def _gt(categories, annotations):
    return {"images": [{"id": i, "file_name": f"img{i}.png", "width": 112, "height": 112} for i in (1, 2, 3)],
            "categories": [{"id": cid, "name": name} for cid, name in categories],
            "annotations": [{"id": k + 1, "image_id": img, "category_id": cid, "bbox": box}
                            for k, (img, cid, box) in enumerate(annotations)]}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("eval_e2e")
    colors = [(200, 60, 60), (60, 200, 60), (60, 60, 200)]
    for i, color in enumerate(colors, 1):
        Image.new("RGB", (112, 112), color).save(root / f"img{i}.png")
    # A: both labels known; image 3's circle is 10 px off (IoU 0.6). B: "square" is not a category of B.
    gt_a = _gt([(1, "Circle"), (2, "square")], [(1, 1, CIRCLE), (1, 2, SQUARE), (2, 2, SQUARE), (3, 1, [30, 20, 40, 40])])
    gt_b = _gt([(5, "circle"), (6, "triangle")], [(1, 5, CIRCLE), (2, 6, [60, 60, 30, 30]), (3, 5, CIRCLE)])
    for name, gt in (("A", gt_a), ("B", gt_b)):
        (root / name).mkdir()
        (root / name / "gt.json").write_text(json.dumps(gt))
    rows = "\n".join(json.dumps({"image": f"img{i}.png", "image_id": i, "width": 112, "height": 112}) for i in (1, 2, 3))
    (root / "rows.jsonl").write_text(rows)
    random_model = build_tiny_model(root / "random", preset="test", seed=0)
    fitted = overfit_fixed_answer(random_model, root / "fitted", [root / f"img{i}.png" for i in (1, 2, 3)])
    return {"root": root, "random": random_model, "fitted": fitted, "gt_a": gt_a, "gt_b": gt_b}


# The (image, problem) pairs the tests below query: COCO mode on A, grounding mode on A and B.
QUERIES = ([(i, COCO_PROMPT.format(categories="Circle, square")) for i in (1, 2, 3)]
           + [(i, GROUNDING_PROMPT.format(category=c)) for i, c in
              ((1, "Circle"), (1, "square"), (2, "square"), (3, "Circle"), (1, "circle"), (2, "triangle"), (3, "circle"))])


def overfit_fixed_answer(model_dir, out_dir, images, max_steps=300):
    """Teach the model to answer ANSWER to exactly the queries of the tests (full-batch Adam, ~60 steps)."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model_dir, size={"shortest_edge": 784, "longest_edge": 3136})
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    prompts, texts, pics = [], [], []
    for image_index, problem in QUERIES:
        msg = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": problem}]}]
        prompt = processor.apply_chat_template(msg, tokenize=False, add_generation_prompt=True)
        prompts.append(prompt)
        texts.append(prompt + ANSWER + "<|im_end|>")
        pics.append(Image.open(images[image_index - 1]).convert("RGB"))
    processor.tokenizer.padding_side = "right"
    batch = dict(processor(text=texts, images=pics, padding=True, return_tensors="pt"))
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    for row, (prompt, pic) in enumerate(zip(prompts, pics)):
        n_prompt = processor(text=[prompt], images=[pic], return_tensors="pt")["input_ids"].shape[1]
        labels[row, :n_prompt] = -100
    batch.update(labels=labels, second_per_grid_ts=torch.ones(len(texts)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(max_steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if loss.item() < 0.02:
            break
    assert loss.item() < 0.05, f"the tiny model did not memorise the answer (loss {loss.item():.3f})"
    model.save_pretrained(out_dir)
    AutoProcessor.from_pretrained(model_dir).save_pretrained(out_dir)
    return out_dir


def run_eval(world, model, out, *extra, datasets=("A",)):
    argv = ["eval", "--model", str(model), "--out", str(out), "--max-new-tokens", "40", *PIXELS]
    for name in datasets:
        argv += ["--gt", str(world["root"] / name / "gt.json"), "--data", str(world["root"] / "rows.jsonl")]
    return main(argv + list(extra))


def pycocotools_stats(gt, dets):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        g = COCO()
        g.dataset = json.loads(json.dumps(gt))
        for k, a in enumerate(g.dataset["annotations"]):
            a.update(area=a["bbox"][2] * a["bbox"][3], iscrowd=0)
        g.createIndex()
        ev = COCOeval(g, g.loadRes(json.loads(json.dumps(dets))), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def test_random_model_garbage_is_counted_not_fatal(world, tmp_path):
    bad = world["root"] / "bad"
    bad.mkdir(exist_ok=True)
    (bad / "gt.json").write_text(json.dumps(world["gt_a"]))
    (bad / "img2.png").write_bytes(b"not a png")  # one unreadable image: that query fails, the rest go on
    for i in (1, 3):
        (bad / f"img{i}.png").write_bytes((world["root"] / f"img{i}.png").read_bytes())
    rc = main(["eval", "--model", str(world["random"]), "--out", str(tmp_path), "--max-new-tokens", "12", *PIXELS,
               "--gt", str(bad / "gt.json"), "--data", str(bad)])
    assert rc == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    answers = metrics["datasets"]["bad"]["answers"]
    assert answers["n_queries"] == 3 and answers["n_failed"] == 1
    assert answers["n_unparsable"] + answers["n_ok"] + answers["n_repaired"] == 2
    assert answers["n_unparsable"] == 2  # a random model does not write a JSON list
    assert metrics["AP"] == 0.0 and json.loads((tmp_path / "detections.json").read_text()) == []
    for png in ("pr_curves.png", "grid_bad.png"):
        with Image.open(tmp_path / png) as im:
            assert im.format == "PNG" and im.size[0] > 100
    lines = (tmp_path / "bad" / "answers.jsonl").read_text().splitlines()
    assert sum("error" in json.loads(line) for line in lines) == 1


def test_fitted_model_coco_mode_equals_pycocotools(world, tmp_path):
    assert run_eval(world, world["fitted"], tmp_path) == 0
    dets = json.loads((tmp_path / "detections.json").read_text())
    expected = [{"image_id": i, "category_id": c, "bbox": b, "score": 0.99} for i in (1, 2, 3)
                for c, b in ((1, CIRCLE), (2, SQUARE))]
    assert dets == expected
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    ref = pycocotools_stats(world["gt_a"], expected)
    keys = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
    np.testing.assert_allclose([metrics[k] for k in keys], ref, atol=1e-12)
    assert 0 < metrics["AP"] < metrics["AP50"] <= 1
    table = (tmp_path / "table.md").read_text()
    assert "| model | Res. | AP50 | AP75 | mAP | Pistols | Pothole | Thermal | ODinW-13 Avg. mAP |" in table
    assert f"| {100 * metrics['AP50']:.1f} | {100 * metrics['AP75']:.1f} | {100 * metrics['AP']:.1f} |" in table


def test_grounding_mode_two_datasets_logprob_scores(world, tmp_path):
    assert run_eval(world, world["fitted"], tmp_path, "--mode", "grounding", "--score", "logprob",
                    datasets=("A", "B")) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    a, b = metrics["datasets"]["A"], metrics["datasets"]["B"]
    # one query per (image, present category): A's images hold {circle, square}, {square}, {circle}
    assert a["answers"]["n_queries"] == 4 and b["answers"]["n_queries"] == 3
    # every answer names "square", unknown in B: counted and dropped
    assert b["answers"]["n_unknown_label"] == 3 and b["answers"]["unknown_labels"] == {"square": 3}
    assert metrics["average_mAP"] == pytest.approx((a["AP"] + b["AP"]) / 2)
    dets = json.loads((tmp_path / "detections.json").read_text())
    scores = [d["score"] for d in dets["A"] + dets["B"]]
    assert all(0 < s < 1 for s in scores) and len(set(round(s, 9) for s in scores)) > 1
    # the written detections re-scored by the coco-eval command give the same metrics
    (tmp_path / "b_dets.json").write_text(json.dumps(dets["B"]))
    assert main(["coco-eval", "--gt", str(world["root"] / "B" / "gt.json"), "--dt", str(tmp_path / "b_dets.json"),
                 "--out", str(tmp_path / "b_metrics.json"), "--quiet"]) == 0
    assert json.loads((tmp_path / "b_metrics.json").read_text())["AP"] == pytest.approx(b["AP"], abs=1e-12)
    assert "| fitted | Dynamic | - | - | - | - | - | - |" in (tmp_path / "table.md").read_text()


@pytest.mark.parametrize("extra,needle", [
    (["--engine", "sglang"], "--engine sglang"),
    (["--gt", "/nonexistent/gt.json", "--data", "/tmp"], "/nonexistent/gt.json does not exist"),
])
def test_user_errors_are_one_line(world, tmp_path, capsys, extra, needle):
    assert run_eval(world, world["random"], tmp_path, *extra) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_missing_rows_and_model_dir_are_clear(world, tmp_path, capsys):
    (tmp_path / "rows.jsonl").write_text(json.dumps({"image": str(world["root"] / "img1.png"), "image_id": 1}))
    rc = main(["eval", "--model", str(world["random"]), "--out", str(tmp_path / "o"), *PIXELS,
               "--gt", str(world["root"] / "A" / "gt.json"), "--data", str(tmp_path / "rows.jsonl")])
    assert rc == 2 and "image id 2 (img2.png) has no row" in capsys.readouterr().err
    rc = main(["eval", "--model", str(tmp_path), "--out", str(tmp_path / "o"),
               "--gt", str(world["root"] / "A" / "gt.json"), "--data", str(world["root"] / "rows.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2 and "not a Hugging Face model directory" in err and "Traceback" not in err
