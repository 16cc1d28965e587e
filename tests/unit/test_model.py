"""The megatron Qwen2.5-VL policy at TP=1 (one gloo process) against transformers' Qwen2_5_VLForConditionalGeneration
with the same weights: HF config mapping, M-RoPE ids, logits, logprobs/entropy, gradients, SDPA, recompute,
dist-checkpoint round trip."""

from __future__ import annotations

import pytest
import torch

from model_loading import IMAGE_TOKEN, VOCAB, hf_logits, image_prompt, load_hf_into, tiny_hf_model
from training_data import world_of_one

from megatron_vr1.config.base import ConfigError
from megatron_vr1.config.model import ModelConfig
from megatron_vr1.config.parallel import ParallelConfig
from megatron_vr1.models.hf_config import padded_vocab_size, text_arch, transformer_config_from_hf

FP32 = ModelConfig(dtype="float32")


@pytest.fixture(scope="module")
def mp():
    with world_of_one():
        yield


def _built(hf, model_cfg=FP32):
    from megatron_vr1.models.build import build_model

    model = build_model(hf.config, model_cfg, ParallelConfig())
    load_hf_into(model, hf)
    return model


def _batch(seed=1):
    """Two image prompts of equal length with different grids, concatenated into a batch."""
    a = image_prompt(seed, 7, (1, 4, 8), 9)
    b = image_prompt(seed + 1, 5, (1, 8, 4), 11)
    ids = torch.cat([a[0], b[0]])
    return ids, torch.cat([a[1], b[1]]), torch.cat([a[2], b[2]])


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# --- HF config -> TransformerConfig -----------------------------------------------------------------------------

def _flat_hub_dict(hf_config) -> dict:
    """The 4.x hub layout of the same config: text fields at the top level, rope in rope_scaling / rope_theta."""
    t = hf_config.text_config
    return dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                num_key_value_heads=t.num_key_value_heads, rms_norm_eps=t.rms_norm_eps, rope_theta=1e6,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, max_position_embeddings=4096,
                hidden_act="silu", tie_word_embeddings=True, image_token_id=IMAGE_TOKEN,
                vision_config=hf_config.vision_config.to_dict())


def test_transformer_config_nested_and_flat_agree():
    hf = tiny_hf_model(0).config
    nested = text_arch(hf)
    flat = text_arch(_flat_hub_dict(hf))
    assert (nested.mrope_section, nested.rope_theta, nested.num_kv_heads) == ((2, 3, 3), 1e6, 2)
    assert flat.mrope_section == nested.mrope_section and flat.rope_theta == nested.rope_theta
    assert flat.tie_word_embeddings and not nested.tie_word_embeddings
    cfg = transformer_config_from_hf(hf, FP32, ParallelConfig(tensor_parallel=2))
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_query_groups, cfg.kv_channels) == (
        2, 64, 128, 2, 16)
    assert cfg.normalization == "RMSNorm" and cfg.gated_linear_unit and cfg.add_qkv_bias and not cfg.add_bias_linear
    assert cfg.mrope_section == [2, 3, 3] and cfg.layernorm_epsilon == 1e-6


def test_qwen2_text_only_config():
    from transformers import Qwen2Config

    q = Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, rope_theta=5e5, rms_norm_eps=1e-5, tie_word_embeddings=True)
    arch = text_arch(q)
    assert arch.mrope_section is None and arch.rope_theta == 5e5 and arch.tie_word_embeddings
    assert transformer_config_from_hf(q, FP32, ParallelConfig()).mrope_section is None


def test_padded_vocab_and_layout_errors():
    assert padded_vocab_size(500, 1) == 512 and padded_vocab_size(500, 2) == 512
    assert padded_vocab_size(151936, 4) == 152064 and padded_vocab_size(512, 1) == 512
    hf = tiny_hf_model(0).config
    with pytest.raises(ConfigError, match="tensor_parallel=4"):
        transformer_config_from_hf(hf, FP32, ParallelConfig(tensor_parallel=4))
    with pytest.raises(ConfigError, match="pipeline_parallel=3"):
        transformer_config_from_hf(hf, FP32, ParallelConfig(pipeline_parallel=3))


# --- M-RoPE ids ------------------------------------------------------------------------------------------------

def test_mrope_ids_equal_transformers_get_rope_index():
    from megatron_vr1.models.mrope import mrope_position_ids

    hf = tiny_hf_model(0)
    ids, _, grid = _batch()
    # A second image in row 0 and left padding in row 1 exercise run grouping and the attention-mask path.
    extra = torch.tensor([[9] + [IMAGE_TOKEN] * 6 + [10, 30, 31]])
    pad_row = torch.tensor([[0] * 10])
    ids = torch.cat([torch.cat([ids[:1], extra], 1), torch.cat([pad_row, ids[1:]], 1)])
    grid = torch.cat([grid[:1], torch.tensor([[1, 4, 6]]), grid[1:]])
    mask = (torch.arange(ids.shape[1]) >= torch.tensor([[0], [10]])).long()
    ours, ours_d = mrope_position_ids(ids, grid, hf.config, attention_mask=mask, return_deltas=True)
    ref, ref_d = hf.model.get_rope_index(ids, (ids == IMAGE_TOKEN).int(), grid, attention_mask=mask)
    assert torch.equal(ours, ref) and torch.equal(ours_d.view(-1), ref_d.view(-1))
    with pytest.raises(ValueError, match="more <\\|image_pad\\|> runs"):
        mrope_position_ids(ids, grid[:1], hf.config)


# --- logits / logprobs / grads vs transformers ---------------------------------------------------------------------

@pytest.mark.parametrize("tie", [False, True])
def test_logits_equal_transformers(mp, tie):
    from megatron_vr1.models.build import mrope_position_ids

    hf = tiny_hf_model(0, tie_word_embeddings=tie)
    model = _built(hf).eval()
    ids, pix, grid = _batch()
    with torch.no_grad():
        ref = hf_logits(hf, ids, pix, grid)
        out = model(ids, mrope_position_ids(ids, grid, hf.config), None, pixel_values=pix, image_grid_thw=grid)
    assert out.shape == (2, ids.shape[1], 512)
    assert _rel(out[..., :VOCAB], ref) < 1e-5


@pytest.mark.parametrize("backend,core", [("sdpa", "SDPAttention"), ("local", "DotProductAttention")])
def test_attention_backends_with_padding_mask_equal_transformers(mp, backend, core):
    from megatron_vr1.models.build import mrope_position_ids
    from megatron_vr1.models.qwen25vl import attention_mask_from_padding

    hf = tiny_hf_model(0)
    model = _built(hf, ModelConfig(dtype="float32", attention_backend=backend)).eval()
    assert type(model.language_model.decoder.layers[0].self_attention.core_attention).__name__ == core
    ids, pix, grid = _batch()
    pad = torch.ones_like(ids)
    pad[1, :3] = 0  # left padding on row 1
    with torch.no_grad():
        ref = hf.model(input_ids=ids, pixel_values=pix, image_grid_thw=grid, attention_mask=pad,
                       mm_token_type_ids=(ids == IMAGE_TOKEN).int(), use_cache=False).last_hidden_state
        ref = hf.lm_head(ref)
        pos = mrope_position_ids(ids, grid, hf.config, attention_mask=pad)
        out = model(ids, pos, attention_mask_from_padding(pad), pixel_values=pix, image_grid_thw=grid)
        plain = model(ids, pos, None, pixel_values=pix, image_grid_thw=grid)
    keep = pad.bool()
    assert _rel(out[..., :VOCAB][keep], ref[keep]) < 1e-5
    assert _rel(plain[0, :, :VOCAB], ref[0]) < 1e-5  # row 0 has no padding: causal-only path agrees


def test_logprobs_entropy_and_grads_equal_transformers(mp):
    from megatron_vr1.models.build import mrope_position_ids
    from megatron_vr1.training.logprobs import token_logprobs

    hf = tiny_hf_model(0)
    model = _built(hf)
    ids, pix, grid = _batch()
    targets = torch.roll(ids, -1, dims=1)
    mask = torch.zeros_like(ids)
    mask[:, -8:-1] = 1  # the completion: last tokens, excluding the wrapped-around final target
    out = model(ids, mrope_position_ids(ids, grid, hf.config), None, pixel_values=pix, image_grid_thw=grid)
    r = token_logprobs(out, targets, mask, vocab_size=VOCAB)
    (-(r.logprobs.sum() / mask.sum()) - 0.01 * r.entropy.sum()).backward()

    ref_logits = hf_logits(hf, ids, pix, grid).float()
    ref_lp_all = torch.log_softmax(ref_logits, -1)
    ref_lp = ref_lp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * mask
    ref_ent = -(ref_lp_all.exp() * ref_lp_all).sum(-1) * mask
    (-(ref_lp.sum() / mask.sum()) - 0.01 * ref_ent.sum()).backward()
    assert (r.logprobs - ref_lp).abs().max() < 1e-5 and (r.entropy - ref_ent).abs().max() < 1e-5
    assert torch.all(r.logprobs[mask == 0] == 0)

    hf_params = dict(hf.named_parameters())
    pairs = {"visual.patch_embed.proj.weight": "model.visual.patch_embed.proj.weight",
             "visual.merger.mlp.2.weight": "model.visual.merger.mlp.2.weight",
             "language_model.decoder.layers.1.self_attention.linear_proj.weight":
                 "model.language_model.layers.1.self_attn.o_proj.weight",
             "language_model.decoder.final_layernorm.weight": "model.language_model.norm.weight"}
    ours = dict(model.named_parameters())
    for m_name, h_name in pairs.items():
        assert _rel(ours[m_name].grad, hf_params[h_name].grad) < 1e-4, m_name
    emb = ours["language_model.embedding.word_embeddings.weight"].grad
    assert _rel(emb[:VOCAB], hf_params["model.language_model.embed_tokens.weight"].grad) < 1e-4


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_tempered_logprobs_equal_log_softmax_of_scaled_logits(mp, temperature):
    """grpo.logprob_temperature=rollout: tokens scored under softmax(logits / T), the sampler's distribution."""
    from megatron_vr1.models.build import mrope_position_ids
    from megatron_vr1.training.logprobs import token_logprobs

    hf = tiny_hf_model(0)
    model = _built(hf)
    ids, pix, grid = _batch()
    targets = torch.roll(ids, -1, dims=1)
    mask = torch.zeros_like(ids)
    mask[:, -8:-1] = 1
    with torch.no_grad():
        out = model(ids, mrope_position_ids(ids, grid, hf.config), None, pixel_values=pix, image_grid_thw=grid)
        r = token_logprobs(out, targets, mask, vocab_size=VOCAB, temperature=temperature)
        ref_all = torch.log_softmax(hf_logits(hf, ids, pix, grid).float() / temperature, -1)
    ref_lp = ref_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * mask
    ref_ent = -(ref_all.exp() * ref_all).sum(-1) * mask
    assert (r.logprobs - ref_lp).abs().max() < 1e-5 and (r.entropy - ref_ent).abs().max() < 1e-5


def test_activation_recompute_gives_same_grads(mp):
    from megatron_vr1.models.build import mrope_position_ids

    hf = tiny_hf_model(0)
    ids, pix, grid = _batch()
    pos = mrope_position_ids(ids, grid, hf.config)
    grads = []
    for recompute in ("none", "full", "selective"):
        model = _built(hf, ModelConfig(dtype="float32", recompute=recompute))
        out = model(ids, pos, None, pixel_values=pix, image_grid_thw=grid)
        out.float().square().mean().backward()
        grads.append(model.language_model.decoder.layers[0].mlp.linear_fc1.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    assert torch.allclose(grads[0], grads[2], rtol=1e-5, atol=1e-7)


def test_fp8_without_transformer_engine_fails_at_build(mp):
    from megatron_vr1.models.build import build_model
    from megatron_vr1.models.specs import MissingTransformerEngine, have_transformer_engine

    if have_transformer_engine():
        pytest.skip("Transformer Engine is installed here")
    hf = tiny_hf_model(0).config
    with pytest.raises(MissingTransformerEngine, match="model.fp8=e4m3 needs Transformer Engine"):
        build_model(hf, ModelConfig(dtype="bfloat16", fp8="e4m3"), ParallelConfig())
    with pytest.raises(MissingTransformerEngine, match="transformer_impl=transformer_engine"):
        build_model(hf, ModelConfig(transformer_impl="transformer_engine"), ParallelConfig())


def test_dist_checkpoint_roundtrip(mp, tmp_path):
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_vr1.models.build import build_model, mrope_position_ids

    hf = tiny_hf_model(0)
    model = _built(hf).eval()
    sd = model.sharded_state_dict()
    assert "visual.patch_embed.proj.weight" in sd and "language_model.output_layer.weight" in sd
    assert isinstance(sd["visual.blocks.0.attn.qkv.weight"], ShardedTensor)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    dist_checkpointing.save(sd, str(ckpt))
    torch.manual_seed(123)
    fresh = build_model(hf.config, FP32, ParallelConfig()).eval()
    fresh.load_state_dict(dist_checkpointing.load(fresh.sharded_state_dict(), str(ckpt)))
    ids, pix, grid = _batch()
    pos = mrope_position_ids(ids, grid, hf.config)
    with torch.no_grad():
        a = model(ids, pos, None, pixel_values=pix, image_grid_thw=grid)
        b = fresh(ids, pos, None, pixel_values=pix, image_grid_thw=grid)
    assert torch.equal(a, b)


def test_checkpoint_dir_config_json_builds_matching_model(mp, tmp_path):
    """From the data helper's on-disk tiny checkpoint: config.json read as a plain dict (what a run loads), tied
    embeddings, the real tokenizer's vocabulary, and a prompt expanded by the real processor."""
    import json

    from PIL import Image
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from megatron_vr1.data.tiny_model import build_tiny_model
    from megatron_vr1.models.build import build_model, mrope_position_ids

    path = build_tiny_model(tmp_path / "tiny", preset="test", tie_word_embeddings=True)
    config_json = json.loads((path / "config.json").read_text())
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path)
    image = Image.fromarray((torch.rand(120, 100, 3) * 255).to(torch.uint8).numpy())
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>find the box<|im_end|>\n"
    enc = processor(text=[text], images=[image], return_tensors="pt")
    model = build_model(config_json, FP32, ParallelConfig()).eval()
    assert model.share_embeddings_and_output_weights
    load_hf_into(model, hf)
    ids, grid = enc["input_ids"], enc["image_grid_thw"]
    with torch.no_grad():
        ref = hf(**enc, use_cache=False).logits
        out = model(ids, mrope_position_ids(ids, grid, config_json), None, pixel_values=enc["pixel_values"],
                    image_grid_thw=grid)
    assert _rel(out[..., :ref.shape[-1]], ref) < 1e-5
