"""A tiny random Qwen2.5-VL checkpoint for the converter tests (config per shared/recipes/cpu-stack.md §1).

Built offline with transformers; no hub access. Float32 so that logit comparisons are meaningful at 1e-5.
"""

from __future__ import annotations

from pathlib import Path


def tiny_config(tie: bool = False, layers: int = 2, vocab: int = 500):
    from transformers import Qwen2_5_VLConfig

    # vocab 500 is deliberately not a multiple of 128, so Megatron pads it (512 at TP1/TP2) and the
    # padding has to be stripped on the way back.
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rope_theta=1e6,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, bos_token_id=0, eos_token_id=2,
                         pad_token_id=0, tie_word_embeddings=tie),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=56, out_hidden_size=64,
                           fullatt_block_indexes=[1], tokens_per_second=2),
        image_token_id=12, video_token_id=13, vision_start_token_id=9, vision_end_token_id=10,
        tie_word_embeddings=tie, torch_dtype="float32")


def build_tiny_vl(out_dir: str | Path, tie: bool = False, seed: int = 0, layers: int = 2, vocab: int = 500) -> Path:
    """Save a random tiny Qwen2_5_VLForConditionalGeneration to ``out_dir`` (safetensors + config.json)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_config(tie=tie, layers=layers, vocab=vocab)).float()
    # Random norms and biases too, so a swapped or dropped tensor can't hide behind an all-ones init.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("ln_q.weight") or name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name or "ln_q" in name else 0.0))
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    return out
