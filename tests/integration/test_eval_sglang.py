"""``megatron-vr1 eval --engine sglang`` against a real SGLang server (CPU engine), checked against the in-process
HF engine's eval of the same model and data.

The model is the tiny Qwen2.5-VL of the test preset, overfit in a few seconds to answer one fixed JSON (boxes in
*input* pixels), so answers parse and AP is neither 0 nor 1; the images have three sizes so that the rescaling
from input to original pixels is the identity for one, a downscale for one and an upscale for one.

Image size: SGLang 0.5.10 resizes an image only inside the HF processor it loads from the served checkpoint
(its processor_config.json / preprocessor_config.json); a /generate request cannot change the budget. So with the
SGLang engine, eval now takes the pixel budget from the served checkpoint (``--min/--max-pixels`` default to it,
and a value that differs is refused) and rescales boxes from the image file's size resized with that budget.
Before this, eval rescaled with its own defaults (28*28 .. 12800*28*28) while the server used the checkpoint's:
test_server_sees_the_size_eval_rescales_from shows that this gave a wrong size for two of the three images.

One server for the module (startup ~45 s on an idle 2-core box).
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image, ImageDraw

from megatron_vr1.cli import main
from megatron_vr1.data.image import smart_resize
from megatron_vr1.eval.queries import COCO_PROMPT, EVAL_MAX_PIXELS, EVAL_MIN_PIXELS
from megatron_vr1.rollout.sglang_server import SGLangNotInstalled, SGLangServer, ServerSpec, find_sglang_python

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# The fixed answer, in input pixels; every input size below is >= 56 px a side, so no box needs clipping.
ANSWER = ('```json\n[\n\t{"bbox_2d": [10, 10, 30, 30], "label": "circle"},\n\t'
          '{"bbox_2d": [5, 30, 20, 50], "label": "square"}\n]\n```')
CATEGORIES = [(1, "circle"), (2, "square")]
# (file, original width, height) -> the size the tiny checkpoint's processor (3136..12544 px, factor 28) feeds
# the model: 112x112 as is, 200x150 down to 112x84, 40x60 up to 56x84.
IMAGES = [("a.png", 112, 112), ("b.png", 200, 150), ("c.png", 40, 60)]
INPUT_SIZES = {"a.png": (112, 112), "b.png": (112, 84), "c.png": (56, 84)}
CHECKPOINT_BUDGET = (56 * 56, 112 * 112)  # megatron_vr1.data.tiny_model's defaults, saved with the processor
MAX_NEW_TOKENS = "64"


def _draw(name: str, width: int, height: int, k: int) -> Image.Image:
    im = Image.new("RGB", (width, height), [(230, 230, 230), (40, 40, 120), (120, 200, 120)][k])
    ImageDraw.Draw(im).ellipse([width // 5, height // 5, width // 2, height // 2], fill=(200, 40, 40))
    return im


def _overfit(model_dir, out_dir, images, max_steps=300):
    """Teach the model to answer ANSWER to the COCO query of each image at the checkpoint's own pixel budget."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    problem = COCO_PROMPT.format(categories=", ".join(name for _, name in CATEGORIES))
    msg = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": problem}]}]
    prompt = processor.apply_chat_template(msg, tokenize=False, add_generation_prompt=True)
    pics = [Image.open(p).convert("RGB") for p in images]
    processor.tokenizer.padding_side = "right"
    batch = dict(processor(text=[prompt + ANSWER + "<|im_end|>"] * len(pics), images=pics, padding=True,
                           return_tensors="pt"))
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    for row, pic in enumerate(pics):
        labels[row, :processor(text=[prompt], images=[pic], return_tensors="pt")["input_ids"].shape[1]] = -100
    batch.update(labels=labels, second_per_grid_ts=torch.ones(len(pics)))
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


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    try:
        find_sglang_python()
    except SGLangNotInstalled as e:
        pytest.skip(str(e))
    from megatron_vr1.data.tiny_model import build_tiny_model

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("eval_sglang")
    for k, (name, w, h) in enumerate(IMAGES):
        _draw(name, w, h, k).save(root / name)
    # Ground truth in original pixels: the answer's circle rescaled exactly on a.png and c.png, off on b.png;
    # the square only on a.png (and off), so 0 < AP < 1 and a wrong rescale would change it.
    gt = {"images": [{"id": i, "file_name": name, "width": w, "height": h} for i, (name, w, h) in enumerate(IMAGES, 1)],
          "categories": [{"id": cid, "name": name} for cid, name in CATEGORIES],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]},
                          {"id": 2, "image_id": 1, "category_id": 2, "bbox": [8, 30, 15, 20]},
                          {"id": 3, "image_id": 2, "category_id": 1, "bbox": [30, 20, 40, 40]},
                          {"id": 4, "image_id": 3, "category_id": 1, "bbox": [10 * 40 / 56, 10 * 60 / 84,
                                                                              20 * 40 / 56, 20 * 60 / 84]}]}
    (root / "gt.json").write_text(json.dumps(gt))
    base = build_tiny_model(root / "random", preset="test", seed=0)
    fitted = _overfit(base, root / "fitted", [root / name for name, _, _ in IMAGES])
    return {"root": root, "model": fitted, "gt": gt}


@pytest.fixture(scope="module")
def server(world):
    srv = SGLangServer(ServerSpec(model_path=str(world["model"]), log_dir=str(world["root"] / "logs")))
    srv.start()
    yield srv
    srv.stop()
    assert not srv.alive()


def _eval(world, out, *extra):
    return main(["eval", "--model", str(world["model"]), "--out", str(out), "--max-new-tokens", MAX_NEW_TOKENS,
                 "--gt", str(world["root"] / "gt.json"), "--data", str(world["root"]), "--name", "shapes", *extra])


def _answers(out):
    return [json.loads(line) for line in (out / "shapes" / "answers.jsonl").read_text().splitlines()]


def test_sglang_eval_matches_hf_eval(world, server, tmp_path):
    # The HF engine at the checkpoint's budget, given explicitly; the SGLang engine with no pixel flags, which
    # must resolve to the same budget (the served checkpoint's).
    hf_out, sg_out = tmp_path / "hf", tmp_path / "sglang"
    lo, hi = CHECKPOINT_BUDGET
    assert _eval(world, hf_out, "--engine", "hf", "--min-pixels", str(lo), "--max-pixels", str(hi)) == 0
    assert _eval(world, sg_out, "--engine", "sglang", "--sglang-url", server.endpoint.url) == 0
    for out in (hf_out, sg_out):
        for f in ("metrics.json", "detections.json", "table.md", "pr_curves.png", "grid_shapes.png"):
            assert (out / f).is_file(), f"{out / f} was not written"
    hf_answers, sg_answers = _answers(hf_out), _answers(sg_out)
    # Greedy decoding in float32 on CPU: the two engines agree to ~1e-5 in logprob (test_sglang_server checks
    # 1e-4), and the memorised answer wins every step by a wide margin, so the texts must be identical.
    assert [a["text"] for a in sg_answers] == [a["text"] for a in hf_answers]
    assert [(a["text"], a["status"]) for a in hf_answers] == [(ANSWER, "ok")] * 3, hf_answers
    # The sizes the boxes are rescaled from: HF's come from its processor's image grid, SGLang's from the
    # checkpoint's budget; both equal the sizes the checkpoint's processor produces.
    for answers in (hf_answers, sg_answers):
        assert {a["image"].rsplit("/", 1)[-1]: (a["input_width"], a["input_height"]) for a in answers} == INPUT_SIZES
    hf_dets = json.loads((hf_out / "detections.json").read_text())
    sg_dets = json.loads((sg_out / "detections.json").read_text())
    assert len(hf_dets) == 6 and sg_dets == hf_dets
    hf_m, sg_m = (json.loads((o / "metrics.json").read_text()) for o in (hf_out, sg_out))
    assert sg_m["engine"] == "sglang" and hf_m["engine"] == "hf"
    assert 0 < hf_m["AP"] < 1
    keys = ["AP", "AP50", "AP75", "AR1", "AR10", "AR100"]
    assert [sg_m[k] for k in keys] == [hf_m[k] for k in keys]
    assert sg_m["datasets"]["shapes"]["answers"] == hf_m["datasets"]["shapes"]["answers"]


def test_server_sees_the_size_eval_rescales_from(world, server):
    """The number of image tokens the server expands each image into is (w/28)*(h/28) of the size eval rescales
    boxes from; the old defaults (28*28 .. 12800*28*28) give other sizes for b.png and c.png."""
    from transformers import AutoProcessor

    from megatron_vr1.commands.eval import _server_input_size
    from megatron_vr1.rollout.sglang_http import call
    from megatron_vr1.rollout.sglang_payloads import GenerateItem, generate_payload

    processor = AutoProcessor.from_pretrained(world["model"], local_files_only=True)
    input_size = _server_input_size(processor.image_processor)
    msg = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "where?"}]}]
    prompt = processor.apply_chat_template(msg, tokenize=False, add_generation_prompt=True)
    n_text = len(processor.tokenizer(prompt)["input_ids"]) - 1  # the one <|image_pad|> placeholder is expanded
    items = [GenerateItem(rid=name, prompt=prompt, image=str(world["root"] / name), temperature=0.0, top_p=1.0,
                          max_new_tokens=1, return_logprob=False) for name, _, _ in IMAGES]
    outs = call(server.endpoint, "/generate", generate_payload(items), timeout=120)
    old_default_differs = 0
    for (name, w, h), out in zip(IMAGES, outs):
        in_w, in_h = input_size(str(world["root"] / name))
        assert (in_w, in_h) == INPUT_SIZES[name]
        assert out["meta_info"]["prompt_tokens"] - n_text == (in_w // 28) * (in_h // 28), name
        old_h, old_w = smart_resize(h, w, min_pixels=EVAL_MIN_PIXELS, max_pixels=EVAL_MAX_PIXELS)
        old_default_differs += (old_w, old_h) != (in_w, in_h)
    assert old_default_differs == 2


def test_pixel_flags_that_differ_from_the_served_checkpoint_are_refused(world, server, tmp_path, capsys):
    rc = _eval(world, tmp_path, "--engine", "sglang", "--sglang-url", server.endpoint.url, "--max-pixels", "3136")
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "min_pixels=3136, max_pixels=12544" in err and "--min-pixels 3136 --max-pixels 12544" in err
    assert not (tmp_path / "metrics.json").exists()
