"""The offline tiny Qwen2.5-VL assets load with transformers and render prompts exactly like its processor."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_vr1.data import prompts
from megatron_vr1.data.tiny_model import JSON_CHUNKS, build_tiny_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def test_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "test", preset="test", seed=0)


@pytest.fixture(scope="module")
def processor(test_dir):
    return transformers.AutoProcessor.from_pretrained(test_dir)


def test_special_tokens_keep_qwen_ids(processor):
    tok = processor.tokenizer
    for i, name in enumerate(prompts.SPECIAL_TOKENS):
        assert tok.convert_tokens_to_ids(name) == i
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == 0


def test_numbers_and_json_scaffolding_are_cheap(processor):
    tok = processor.tokenizer
    for n in range(1000):
        assert len(tok(str(n), add_special_tokens=False).input_ids) == 1, n
    target = prompts.sft_target([("circle", (3, 4, 30, 41)), ("square", (10, 0, 55, 56))])
    ids = tok(target, add_special_tokens=False).input_ids
    # the opening fence, then per object: '{"bbox_2d": [', 4 numbers, 3 ', ', '], "label": "', the label
    # and the closing chunk ('"},\n\t' or the final '"}\n]\n```')
    assert len(ids) == 1 + 2 * 11
    assert tok.decode(ids) == target
    assert all(len(tok(c, add_special_tokens=False).input_ids) == 1 for c in JSON_CHUNKS)


def test_sft_target_is_the_papers_json_block():
    text = prompts.sft_target([("red circle", (1.4, 2.6, 30, 40))])
    assert text.startswith("```json\n[\n\t{") and text.endswith("}\n]\n```")
    body = json.loads(text.removeprefix("```json\n").removesuffix("\n```"))
    assert body == [{"bbox_2d": [1, 3, 30, 40], "label": "red circle"}]
    assert json.loads(prompts.sft_target([]).removeprefix("```json\n").removesuffix("\n```")) == []


@pytest.mark.parametrize("size", [(56, 56), (100, 120), (37, 90), (140, 28)])
def test_render_prompt_matches_processor(processor, size):
    width, height = size
    rng = np.random.default_rng(width * height)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    problem = prompts.detection_prompt(["circle", "square"])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": problem}]}]
    chat = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    enc = processor(text=[chat], images=[image], return_tensors="pt")
    grid = enc["image_grid_thw"][0].tolist()
    rendered = prompts.render_prompt(problem, grid)
    n_pad = prompts.num_image_tokens(grid)
    assert rendered == chat.replace(prompts.IMAGE_PAD, prompts.IMAGE_PAD * n_pad)
    ours = processor.tokenizer(rendered, add_special_tokens=False).input_ids
    assert ours == enc["input_ids"][0].tolist()


def test_model_loads_and_runs_forward(test_dir, processor):
    model = transformers.AutoModelForImageTextToText.from_pretrained(test_dir)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert not model.config.tie_word_embeddings
    assert 150_000 < sum(p.numel() for p in model.parameters()) < 600_000
    image = Image.new("RGB", (56, 56), (200, 30, 30))
    chat = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Locate every circle."}]}],
        add_generation_prompt=True, tokenize=False)
    enc = processor(text=[chat], images=[image], return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape[:2] == enc["input_ids"].shape and torch.isfinite(logits).all()
    assert logits.shape[-1] == model.config.text_config.vocab_size >= len(processor.tokenizer)


def test_build_is_deterministic_per_seed(tmp_path, test_dir):
    again = build_tiny_model(tmp_path / "again", preset="test", seed=0)
    other = build_tiny_model(tmp_path / "other", preset="test", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "processor_config.json"):
        assert (again / name).read_bytes() == (test_dir / name).read_bytes(), name
    assert (other / "model.safetensors").read_bytes() != (test_dir / "model.safetensors").read_bytes()


def test_tied_variant_shares_embeddings(tmp_path):
    from safetensors import safe_open

    out = build_tiny_model(tmp_path / "tied", preset="test", seed=0, tie_word_embeddings=True)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    model = transformers.AutoModelForImageTextToText.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    with safe_open(out / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in set(f.keys())


def test_demo_preset_is_tiny_demos_model(tmp_path):
    out = build_tiny_model(tmp_path / "demo", preset="demo", seed=0)
    model = transformers.AutoModelForImageTextToText.from_pretrained(out)
    cfg = model.config.text_config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (128, 4, 512)
    assert 1_500_000 < sum(p.numel() for p in model.parameters()) < 3_000_000
    # the ordinal init gives neighbouring coordinates similar embeddings, distant ones dissimilar
    tok = transformers.AutoTokenizer.from_pretrained(out)
    emb = model.get_input_embeddings().weight
    e = lambda n: emb[tok.convert_tokens_to_ids(str(n))]  # noqa: E731
    cos = torch.nn.functional.cosine_similarity
    assert cos(e(20), e(21), dim=0) > cos(e(20), e(50), dim=0)


def test_cli_tiny_model(tmp_path, capsys):
    from megatron_vr1.cli import main

    assert main(["data", "tiny-model", "--out", str(tmp_path / "cli"), "--preset", "test"]) == 0
    assert (tmp_path / "cli" / "model.safetensors").exists()
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(["data", "tiny-model", "--out", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err
    assert "a_file" in err and "Traceback" not in err


def test_model_inputs_of_a_sample_equal_the_processor(processor, tmp_path):
    from megatron_vr1.data.dataset import model_inputs
    from megatron_vr1.data.schema import parse_row

    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (60, 100, 3), dtype=np.uint8)).save(tmp_path / "im.png")
    raw = {"problem": prompts.detection_prompt(["circle"]), "image": "im.png",
           "solution": json.dumps([["circle", [[1, 2, 30, 40]]]]), "width": 100, "height": 60, "num_instances": 1,
           "target_id_maps": json.dumps({"circle": 1}), "source": "t"}
    sample = parse_row(raw, file="t.jsonl", row=1, base_dir=tmp_path).to_sample("t:1", min_pixels=56 * 56,
                                                                                max_pixels=112 * 112)
    ours = model_inputs(sample, min_pixels=56 * 56, max_pixels=112 * 112)
    chat = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.problem}]}],
        add_generation_prompt=True, tokenize=False)
    ref = processor(text=[chat], images=[Image.open(tmp_path / "im.png")], return_tensors="np")
    assert list(ours.image_grid_thw) == ref["image_grid_thw"][0].tolist()
    assert np.abs(ours.pixel_values - ref["pixel_values"]).max() == 0.0
    assert processor.tokenizer(ours.prompt, add_special_tokens=False).input_ids == ref["input_ids"][0].tolist()
