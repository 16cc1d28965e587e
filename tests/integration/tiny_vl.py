"""A tiny random Qwen2.5-VL checkpoint with an offline tokenizer and processor (shared/recipes/cpu-stack.md §1).

Uses the data package's ``build_tiny_model`` when it exists; otherwise builds the same kind of checkpoint here.
Nothing is downloaded. The checkpoint is written by the trainer's transformers and must load in SGLang's 5.3.0.
"""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
            "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
IMAGE_PAD_ID = 12
IMAGE_PROMPT = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Find the red box and the cat."
                "<|im_end|>\n<|im_start|>assistant\n")
TEXT_PROMPT = "<|im_start|>user\nwhere is the dog in the picture?<|im_end|>\n<|im_start|>assistant\n"


def build(out_dir: Path, seed: int = 0) -> Path:
    """Write the checkpoint into ``out_dir`` (idempotent) and return it."""
    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    if importlib.util.find_spec("megatron_vr1.data.tiny_model") is not None:
        from megatron_vr1.data.tiny_model import build_tiny_model

        build_tiny_model(out_dir, preset="test")
        return out_dir
    return _build_here(out_dir, seed)


def _build_here(out_dir: Path, seed: int) -> Path:
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import (PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    rx = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
    tok = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                               byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(rx), behavior="isolated", invert=False),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    corpus = ["the cat sat on the mat near a red box", "where is the dog in the picture?",
              '[{"bbox_2d": [10, 20, 30, 40], "label": "cat"}]', "find the person and the car. answer in json"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, min_frequency=1, special_tokens=SPECIALS,
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                     unk_token=None, additional_special_tokens=SPECIALS[1:],
                                     chat_template=QWEN_TEMPLATE)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rope_theta=1e6,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, rms_norm_eps=1e-6,
                         bos_token_id=0, eos_token_id=2, pad_token_id=0),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=56, out_hidden_size=64,
                           fullatt_block_indexes=[1], tokens_per_second=2),
        image_token_id=IMAGE_PAD_ID, video_token_id=13, vision_start_token_id=9, vision_end_token_id=10,
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()
    # Random init gives near-uniform logits; sharpen lm_head so greedy outputs and logprobs carry signal.
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    proc = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112),
                               tokenizer=hf_tok, video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN_TEMPLATE)
    proc.save_pretrained(out_dir)
    return out_dir


def png_bytes(width: int = 100, height: int = 120, seed: int = 0) -> bytes:
    """A small deterministic RGB image as PNG bytes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()
