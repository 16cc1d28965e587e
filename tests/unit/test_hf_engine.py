"""HFEngine on the tiny random Qwen2.5-VL: batching with left padding, logprob conventions, sampling, stop
conditions and weight updates. The model's answers are garbage; only the engine's contracts are checked."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_vr1.data.tiny_model import build_tiny_model
from megatron_vr1.rollout.engine import GenerationRequest, RolloutEngine, SamplingParams
from megatron_vr1.rollout.hf_engine import HFEngine, hub_to_module_name


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_engine")
    model_a = build_tiny_model(root / "model_a", preset="test", seed=0)
    model_b = build_tiny_model(root / "model_b", preset="test", seed=1)
    rng = np.random.default_rng(0)
    images = []
    for i, (w, h) in enumerate([(56, 56), (84, 56), (56, 112)]):
        path = root / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        images.append(str(path))
    return {"a": model_a, "b": model_b, "images": images, "root": root}


@pytest.fixture(scope="module")
def engine(assets):
    torch.set_num_threads(2)
    return HFEngine(assets["a"], max_batch_size=8)


def req(engine, rid, problem, image, **sampling):
    return GenerationRequest(request_id=rid, sample_id=f"s-{rid}", prompt=engine.render_prompt(problem), image=image,
                             sampling=SamplingParams(**sampling))


def test_implements_the_protocol(engine):
    assert isinstance(engine, RolloutEngine)
    assert engine.weight_version == 0


def test_batched_greedy_equals_one_by_one_with_left_padding(engine, assets):
    """Different prompt lengths and image sizes in one batch give the same tokens as generating alone."""
    reqs = [req(engine, "r0", "Locate every circle in the image.", assets["images"][0], temperature=0, max_new_tokens=10),
            req(engine, "r1", "Locate every item from the category list in the image and output the coordinates in "
                              "JSON format. The category set includes circle, square.", assets["images"][1],
                temperature=0, max_new_tokens=10),
            req(engine, "r2", "hi", assets["images"][2], temperature=0, max_new_tokens=10)]
    batched = engine.generate(reqs)
    assert [len(g) for g in batched] == [1, 1, 1]
    for r, group in zip(reqs, batched):
        (c,) = group
        (alone,) = engine.generate([r])[0]
        assert c.token_ids == alone.token_ids
        np.testing.assert_allclose(c.logprobs, alone.logprobs, atol=1e-4)
        assert c.request_id == f"{r.request_id}-0" and c.sample_id == r.sample_id
        assert len(c.logprobs) == len(c.token_ids) and c.finish_reason in ("stop", "length")
        assert c.text == engine.decode(c.token_ids)


def test_rollout_logprobs_equal_teacher_forced(engine, assets):
    """The logprobs returned with a sampled completion are the raw model log-probs of those tokens."""
    r = req(engine, "tf", "Locate every square in the image.", assets["images"][1], temperature=1.0, max_new_tokens=12,
            seed=5)
    (c,) = engine.generate([r])[0]
    tf = engine.teacher_forced_logprobs(r.prompt, r.image, c.token_ids)
    np.testing.assert_allclose(c.logprobs, tf, atol=1e-4)
    assert all(lp <= 0 for lp in c.logprobs)


def test_rollout_logprobs_at_a_temperature_are_of_the_tempered_distribution(engine, assets):
    """Sampled at T, the reported logprobs are log softmax(logits / T), as SGLang reports them and as the trainer
    scores tokens with grpo.logprob_temperature=rollout."""
    r = req(engine, "tt", "Locate every square in the image.", assets["images"][1], temperature=0.6,
            max_new_tokens=12, seed=5)
    (c,) = engine.generate([r])[0]
    np.testing.assert_allclose(c.logprobs, engine.teacher_forced_logprobs(r.prompt, r.image, c.token_ids, 0.6),
                               atol=1e-4)
    raw = engine.teacher_forced_logprobs(r.prompt, r.image, c.token_ids)
    assert max(abs(a - b) for a, b in zip(c.logprobs, raw)) > 1e-3  # not the T=1 values


def test_sampling_n_and_seed(engine, assets):
    r = req(engine, "s", "Locate every ring.", assets["images"][0], temperature=1.0, max_new_tokens=8, n=4, seed=11)
    first, second = engine.generate([r])[0], engine.generate([r])[0]
    assert [c.request_id for c in first] == ["s-0", "s-1", "s-2", "s-3"]
    assert [c.token_ids for c in first] == [c.token_ids for c in second]  # same seed: same samples
    assert len({c.token_ids for c in first}) > 1  # random model at T=1: the 4 samples differ
    other = engine.generate([req(engine, "s", "Locate every ring.", assets["images"][0], temperature=1.0,
                                 max_new_tokens=8, n=4, seed=12)])[0]
    assert [c.token_ids for c in other] != [c.token_ids for c in first]


def test_finish_reasons_length_and_stop_string(engine, assets):
    (c,) = engine.generate([req(engine, "l", "hi", assets["images"][0], temperature=0, max_new_tokens=6)])[0]
    if engine.eos_ids and not set(c.token_ids) & set(engine.eos_ids):
        assert c.finish_reason == "length" and len(c.token_ids) == 6
    stop = engine.decode(c.token_ids[:3])[-2:]
    assert stop, "the greedy answer decodes to text"
    (s,) = engine.generate([req(engine, "l", "hi", assets["images"][0], temperature=0, max_new_tokens=6,
                                stop=(stop,))])[0]
    assert s.finish_reason == "stop" and stop in s.text and len(s.token_ids) <= 3
    assert s.token_ids == c.token_ids[:len(s.token_ids)]


def test_expanded_image_pads_in_prompt_are_accepted(engine, assets):
    """data.prompts.render_prompt expands <|image_pad|>; the engine gives the same answer for both forms."""
    from megatron_vr1.data.prompts import render_prompt

    problem = "Locate every star."
    w, h = engine.input_size(assets["images"][0])
    expanded = render_prompt(problem, (1, h // 14, w // 14))
    a = engine.generate([req(engine, "x", problem, assets["images"][0], temperature=0, max_new_tokens=5)])[0][0]
    b = engine.generate([GenerationRequest(request_id="x", sample_id="x", prompt=expanded, image=assets["images"][0],
                                           sampling=SamplingParams(temperature=0, max_new_tokens=5))])[0][0]
    assert a.token_ids == b.token_ids


def test_a_generated_image_pad_is_scored_as_a_plain_token(assets):
    """A completion may contain the image-pad id (the policy generated it). generate() decodes it as a plain token,
    as SGLang does; teacher forcing after an image prompt scores it the same way instead of raising "Image features
    and image tokens do not match" (it used to, which made the SGLang parity tests error when a sample hit it)."""
    eng = HFEngine(assets["a"])
    pad = eng.model.config.image_token_id
    prompt, image = eng.render_prompt("Locate every square in the image."), assets["images"][1]
    with torch.no_grad():  # make the pad id a likely sample: its lm_head row points where the hidden states do
        logits = eng.model(**eng._encode([prompt], [Image.open(image).convert("RGB")])).logits[0, -1]
        eng.model.lm_head.weight[pad] = eng.model.lm_head.weight[int(logits.argmax())] * 12.0
    r = GenerationRequest(request_id="p", sample_id="p", prompt=prompt, image=image,
                          sampling=SamplingParams(temperature=1.0, max_new_tokens=16, n=8, seed=3))
    group = eng.generate([r])[0]
    with_pad = [c for c in group if pad in c.token_ids[:-1]]  # a pad with tokens after it
    assert with_pad, "no sample generated the image-pad id; raise the lm_head scale"
    for c in group:
        np.testing.assert_allclose(c.logprobs, eng.teacher_forced_logprobs(prompt, image, c.token_ids), atol=1e-4)


def test_update_weights_matches_an_engine_loaded_with_those_weights(assets):
    """Pushing model B's safetensors (hub names) into an engine holding A makes it produce B's logprobs."""
    from safetensors.torch import load_file

    eng_a, eng_b = HFEngine(assets["a"]), HFEngine(assets["b"])
    prompt = eng_a.render_prompt("Locate every circle.")
    image = assets["images"][1]
    tokens = eng_b.generate([GenerationRequest(request_id="u", sample_id="u", prompt=prompt, image=image,
                                               sampling=SamplingParams(temperature=0, max_new_tokens=8))])[0][0].token_ids
    before = eng_a.teacher_forced_logprobs(prompt, image, tokens)
    expected = eng_b.teacher_forced_logprobs(prompt, image, tokens)
    assert max(abs(x - y) for x, y in zip(before, expected)) > 1e-3  # the two random models differ

    weights = load_file(str(assets["b"] / "model.safetensors"))
    assert any(k.startswith("visual.") for k in weights)  # hub names, not module names
    assert eng_a.update_weights(weights.items(), version=3) == len(weights)
    assert eng_a.weight_version == 3
    np.testing.assert_allclose(eng_a.teacher_forced_logprobs(prompt, image, tokens), expected, atol=1e-6)
    c = eng_a.generate([GenerationRequest(request_id="v", sample_id="v", prompt=prompt, image=image,
                                          sampling=SamplingParams(temperature=0, max_new_tokens=8))])[0][0]
    assert c.token_ids == tokens and c.weight_version == 3

    with pytest.raises(ValueError, match="not above the current 3"):
        eng_a.update_weights(weights.items(), version=3)
    with pytest.raises(KeyError, match="not a parameter"):
        eng_a.update_weights([("model.layers.0.nonexistent", torch.zeros(1))], version=4)
    name = next(iter(weights))
    with pytest.raises(ValueError, match="has shape"):
        eng_a.update_weights([(name, torch.zeros(3, 3, 3))], version=4)
    with pytest.raises(KeyError, match="parameters missing"):
        eng_a.load_state_dict({name: weights[name]}, version=5)
    eng_a.load_state_dict(load_file(str(assets["a"] / "model.safetensors")), version=6)
    np.testing.assert_allclose(eng_a.teacher_forced_logprobs(prompt, image, tokens), before, atol=1e-6)


def test_hub_to_module_names():
    assert hub_to_module_name("visual.blocks.0.attn.qkv.weight") == "model.visual.blocks.0.attn.qkv.weight"
    assert hub_to_module_name("model.layers.1.mlp.up_proj.weight") == "model.language_model.layers.1.mlp.up_proj.weight"
    assert hub_to_module_name("model.language_model.norm.weight") == "model.language_model.norm.weight"
    assert hub_to_module_name("lm_head.weight") == "lm_head.weight"


def test_bad_image_names_the_request(engine, tmp_path):
    bad = tmp_path / "not_an_image.png"
    bad.write_bytes(b"definitely not a png")
    with pytest.raises(ValueError, match="request r-bad: cannot read image"):
        engine.generate([req(engine, "r-bad", "hi", str(bad), temperature=0, max_new_tokens=2)])
    with pytest.raises(FileNotFoundError, match="not a Hugging Face model directory"):
        HFEngine(tmp_path)


@pytest.mark.parametrize("h,w", [(480, 640), (56, 56), (1000, 30), (4000, 3000), (20, 20)])
def test_eval_smart_resize_matches_transformers(h, w):
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize

    from megatron_vr1.eval.queries import EVAL_MAX_PIXELS, EVAL_MIN_PIXELS, smart_resize

    assert smart_resize(h, w, min_pixels=EVAL_MIN_PIXELS, max_pixels=EVAL_MAX_PIXELS) == tuple(hf_smart_resize(h, w, factor=28, min_pixels=28 * 28, max_pixels=12800 * 28 * 28))
