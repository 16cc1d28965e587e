"""Test-only: a tiny random transformers Qwen2.5-VL, image+text prompts for it, and a minimal HF -> megatron
loader for one (TP, PP) shard. The real name tables live in megatron_vr1/convert/ (issue #6); this one exists so
the model tests do not depend on it and stays private to tests.
"""

from __future__ import annotations

import torch

IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 12, 13, 9, 10
VOCAB = 500  # deliberately not a multiple of 128: exercises vocab padding


def tiny_hf_config(tie_word_embeddings: bool = False, num_layers: int = 2):
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_theta=1e6, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                         rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=2, pad_token_id=0),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=56, out_hidden_size=64,
                           fullatt_block_indexes=[1], tokens_per_second=2),
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END, tie_word_embeddings=tie_word_embeddings)


def tiny_hf_model(seed: int = 0, **kw):
    """A random fp32 Qwen2_5_VLForConditionalGeneration in eval mode (same weights for the same seed)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_hf_config(**kw)).float().eval()
    # Random init leaves RMSNorm weights at 1 and biases at 0; perturb them so the loader's mapping is tested.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("ln_q.weight") or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def image_prompt(seed: int, text_before: int, grid: tuple[int, int, int], text_after: int):
    """input_ids [1, S], pixel_values [patches, 1176], image_grid_thw [1, 3] for one image between text runs."""
    g = torch.Generator().manual_seed(seed)
    t, h, w = grid
    n_pad = t * h * w // 4
    text = lambda n: torch.randint(20, VOCAB, (n,), generator=g)  # noqa: E731
    ids = torch.cat([text(text_before), torch.tensor([VISION_START]), torch.full((n_pad,), IMAGE_TOKEN),
                     torch.tensor([VISION_END]), text(text_after)])
    pixels = torch.randn(t * h * w, 3 * 2 * 14 * 14, generator=g)
    return ids[None], pixels, torch.tensor([list(grid)])


def hf_logits(hf_model, input_ids, pixel_values, image_grid_thw) -> torch.Tensor:
    out = hf_model(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                   mm_token_type_ids=(input_ids == IMAGE_TOKEN).int(), use_cache=False)
    return out.logits


# --- HF -> megatron local-spec names, for one TP rank -------------------------------------------------------------

def _qkv(sd, p, heads, kv_heads, head_dim, rank, tp, kind):
    """Megatron's grouped QKV: per KV group [q heads of the group; k; v], TP shards take whole groups."""
    q, k, v = (sd[f"{p}.self_attn.{n}_proj.{kind}"] for n in "qkv")
    per = heads // kv_heads
    q = q.reshape(kv_heads, per * head_dim, *q.shape[1:])
    k = k.reshape(kv_heads, head_dim, *k.shape[1:])
    v = v.reshape(kv_heads, head_dim, *v.shape[1:])
    fused = torch.cat([q, k, v], dim=1)
    g = kv_heads // tp
    return fused[rank * g:(rank + 1) * g].reshape(-1, *q.shape[2:])


def _rows(t, rank, tp):
    n = t.shape[0] // tp
    return t[rank * n:(rank + 1) * n]


def _cols(t, rank, tp):
    n = t.shape[1] // tp
    return t[:, rank * n:(rank + 1) * n]


def _pad_rows(t, rows):
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])]) if rows > t.shape[0] else t


def megatron_shard_from_hf(hf_sd: dict, hf_config, tp_rank: int, tp: int, layer_offset: int, num_local_layers: int,
                           padded_vocab: int, pre_process: bool, post_process: bool) -> dict:
    """{megatron state-dict name: tensor} for the shard of this rank, from an HF (v5 in-memory) state dict."""
    tc = hf_config.text_config
    heads, kv, hd = tc.num_attention_heads, tc.num_key_value_heads, tc.hidden_size // tc.num_attention_heads
    out = {}
    if pre_process:
        for k, v in hf_sd.items():
            if k.startswith("model.visual."):
                out["visual." + k[len("model.visual."):]] = v
        out["language_model.embedding.word_embeddings.weight"] = _rows(
            _pad_rows(hf_sd["model.language_model.embed_tokens.weight"], padded_vocab), tp_rank, tp)
    for i in range(num_local_layers):
        p = f"model.language_model.layers.{i + layer_offset}"
        m = f"language_model.decoder.layers.{i}"
        out[f"{m}.self_attention.linear_qkv.weight"] = _qkv(hf_sd, p, heads, kv, hd, tp_rank, tp, "weight")
        out[f"{m}.self_attention.linear_qkv.bias"] = _qkv(hf_sd, p, heads, kv, hd, tp_rank, tp, "bias")
        out[f"{m}.self_attention.linear_proj.weight"] = _cols(hf_sd[f"{p}.self_attn.o_proj.weight"], tp_rank, tp)
        out[f"{m}.input_layernorm.weight"] = hf_sd[f"{p}.input_layernorm.weight"]
        out[f"{m}.pre_mlp_layernorm.weight"] = hf_sd[f"{p}.post_attention_layernorm.weight"]
        out[f"{m}.mlp.linear_fc1.weight"] = torch.cat([_rows(hf_sd[f"{p}.mlp.gate_proj.weight"], tp_rank, tp),
                                                       _rows(hf_sd[f"{p}.mlp.up_proj.weight"], tp_rank, tp)])
        out[f"{m}.mlp.linear_fc2.weight"] = _cols(hf_sd[f"{p}.mlp.down_proj.weight"], tp_rank, tp)
    if post_process:
        out["language_model.decoder.final_layernorm.weight"] = hf_sd["model.language_model.norm.weight"]
        if not hf_config.tie_word_embeddings:
            out["language_model.output_layer.weight"] = _rows(_pad_rows(hf_sd["lm_head.weight"], padded_vocab),
                                                              tp_rank, tp)
        elif not pre_process:
            # Tied weights on a last stage without the embedding: megatron keeps a copy in output_layer.
            out["language_model.output_layer.weight"] = _rows(
                _pad_rows(hf_sd["model.language_model.embed_tokens.weight"], padded_vocab), tp_rank, tp)
    return out


def load_hf_into(model, hf_model) -> dict:
    """Copy ``hf_model``'s weights into this rank's megatron ``model`` (strict on the megatron side).
    Returns the {megatron name: HF-derived tensor} map that was loaded."""
    from megatron.core import parallel_state as ps

    from megatron_vr1.models.hf_config import padded_vocab_size

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    lm = model.language_model
    n_local = len(lm.decoder.layers)
    offset = lm.decoder.layers[0].layer_number - 1 if n_local else 0
    padded = padded_vocab_size(hf_model.config.text_config.vocab_size, tp)
    shard = megatron_shard_from_hf(hf_model.state_dict(), hf_model.config, tp_rank, tp, offset, n_local, padded,
                                   model.pre_process, model.post_process)
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    if any(k.endswith("linear_qkv.layer_norm_weight") for k in own):
        # The Transformer Engine spec fuses the pre-attention / pre-MLP norms into the following linear layer.
        te_names = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
                    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
        shard = {next((k.replace(a, b) for a, b in te_names.items() if k.endswith(a)), k): v for k, v in shard.items()}
    missing = sorted(set(own) - set(shard))
    unexpected = sorted(set(shard) - set(own))
    if missing or unexpected:
        raise KeyError(f"loader mismatch: missing {missing[:8]} unexpected {unexpected[:8]}")
    with torch.no_grad():
        for k, v in shard.items():
            if own[k].shape != v.shape:
                raise ValueError(f"{k}: megatron {tuple(own[k].shape)} vs from HF {tuple(v.shape)}")
            own[k].copy_(v)
    return shard
