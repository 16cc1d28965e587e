"""Offline tiny Qwen2.5-VL assets: tokenizer, processor, config and a random checkpoint, built in seconds.

Nothing is downloaded. The tokenizer is a byte-level BPE trained here with ``tokenizers``; it keeps
Qwen2.5-VL's special tokens at ids 0..13 and its chat template, so transformers' ``Qwen2_5_VLProcessor``
and SGLang load the directory like a real Qwen2.5-VL checkpoint. Two changes make localization answers
short: the pre-tokenizer groups up to three digits (every integer 0..999 is one token) and the JSON
scaffolding of the SFT answer is a handful of added tokens.

The checkpoint is written by transformers 5.23 as safetensors; the config uses only fields that
transformers 5.3.0 (SGLang 0.5.10.post1's pin) also reads.

torch/transformers/tokenizers are imported inside the functions so ``megatron_vr1.data`` stays light.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from megatron_vr1.data import prompts

Preset = Literal["test", "demo"]

# Qwen2's pre-tokenizer regex with \p{N}{1,3} instead of \p{N}: numbers split into chunks of <= 3 digits,
# so a coordinate is one pre-token and (after BPE training on 0..999) one token.
PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                     r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")

JSON_CHUNKS: tuple[str, ...] = (
    "```json\n[\n\t", '{"bbox_2d": [', '], "label": "', '"},\n\t', '"}\n]\n```', "```json\n[]\n```", ", ",
)
"""Added (non-special) tokens covering the SFT answer's scaffolding: one object costs 11 tokens."""

SYNTH_WORDS: tuple[str, ...] = (
    "circle", "square", "triangle", "diamond", "cross", "frame", "ring", "hexagon",
    "red", "green", "blue", "yellow", "purple", "orange", "cyan", "magenta", "object", "shape",
)

@dataclass(frozen=True, slots=True, kw_only=True)
class TinyModelSpec:
    """Sizes of a tiny Qwen2.5-VL. ``vocab_size`` is the tokenizer's length rounded up to a multiple of 64."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rope_theta: float
    vision_depth: int
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_num_heads: int
    vision_window_size: int
    vision_fullatt_block_indexes: tuple[int, ...]
    tie_word_embeddings: bool = False
    sine_number_init_max: int = 0
    """If > 0: initialise the embedding and lm_head rows of the number tokens 0..N with sinusoidal
    features (an ordinal prior that tiny-demo found speeds up learning coordinates); 0 = plain random."""
    min_pixels: int = 56 * 56
    max_pixels: int = 112 * 112
    """The saved image processor's pixel budget (smart_resize)."""


PRESETS: dict[str, TinyModelSpec] = {
    # ~0.3M params (cpu-stack §1's shape; the vocabulary holds 0..999 as tokens): unit tests and converters.
    "test": TinyModelSpec(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, rope_theta=1e6, vision_depth=2, vision_hidden_size=32,
                          vision_intermediate_size=64, vision_num_heads=2, vision_window_size=56,
                          vision_fullatt_block_indexes=(1,)),
    # ~2.2M params: tiny-demo.md's model that learned to localise 56 px shapes in minutes on 2 CPU cores.
    "demo": TinyModelSpec(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, rope_theta=1e4, vision_depth=2, vision_hidden_size=128,
                          vision_intermediate_size=256, vision_num_heads=4, vision_window_size=112,
                          vision_fullatt_block_indexes=(0, 1), sine_number_init_max=56),
}


def tokenizer_corpus() -> list[str]:
    """The training text: role words, every prompt template, the synthetic categories/colours and 0..999."""
    words = list(SYNTH_WORDS)
    lines = [prompts.DEFAULT_SYSTEM, "system user assistant"]
    for tpl in ("qwen25vl", "griffon"):
        lines.append(prompts.detection_prompt(words[:8], tpl))
        lines.append(prompts.grounding_prompt("object", tpl))
        lines.append(prompts.rec_prompt("the red circle on the left", tpl))
    lines += [" ".join(words), "\n".join(words)]
    lines += [" ".join(str(i) for i in range(1000))]
    # min_frequency=2 in training: every line twice, numbers a few more times so their merges win ties early.
    return lines * 2 + [" ".join(str(i) for i in range(1000))] * 3


def build_tokenizer(*, vocab_size: int = 2048) -> Any:
    """Train the byte-level BPE and wrap it as a ``PreTrainedTokenizerFast`` with Qwen's chat template."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(prompts.SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    tok.add_tokens([AddedToken(c, normalized=False, special=False) for c in JSON_CHUNKS])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=prompts.IM_END, pad_token="<|endoftext|>",
                                 unk_token=None, additional_special_tokens=list(prompts.SPECIAL_TOKENS[1:]),
                                 chat_template=prompts.QWEN25VL_CHAT_TEMPLATE, model_max_length=32768)
    for i, name in enumerate(prompts.SPECIAL_TOKENS):
        if hf.convert_tokens_to_ids(name) != i:  # the model config hard-codes these ids
            raise RuntimeError(f"tokenizer build: special token {name} got id {hf.convert_tokens_to_ids(name)}, "
                               f"expected {i}")
    return hf


def build_processor(tokenizer: Any, spec: TinyModelSpec) -> Any:
    """``Qwen2_5_VLProcessor`` = Qwen2VL image processor + the tokenizer + Qwen2VL video processor."""
    from megatron_vr1.data.image import require_torchvision

    require_torchvision()  # without it transformers only offers a placeholder video processor
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)
    return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               video_processor=Qwen2VLVideoProcessor(), chat_template=tokenizer.chat_template)


def _mrope_sections(head_dim: int) -> list[int]:
    # sections over (t, h, w) must sum to head_dim/2; t gets a quarter, h and w share the rest.
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def build_config(tokenizer: Any, spec: TinyModelSpec) -> Any:
    """A ``Qwen2_5_VLConfig`` for ``spec`` with the tokenizer's special-token ids."""
    from transformers import Qwen2_5_VLConfig

    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in prompts.SPECIAL_TOKENS}
    head_dim = spec.hidden_size // spec.num_attention_heads
    text = dict(
        vocab_size=(len(tokenizer) + 63) // 64 * 64, hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=4096, rope_theta=spec.rope_theta,
        rope_scaling={"type": "mrope", "mrope_section": _mrope_sections(head_dim)},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids[prompts.IM_END], pad_token_id=ids["<|endoftext|>"],
        # Older transformers (5.3.0) read the tie flag from the text config; newer ones from the top level.
        tie_word_embeddings=spec.tie_word_embeddings,
    )
    vision = dict(
        depth=spec.vision_depth, hidden_size=spec.vision_hidden_size, intermediate_size=spec.vision_intermediate_size,
        num_heads=spec.vision_num_heads, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
        window_size=spec.vision_window_size, out_hidden_size=spec.hidden_size,
        fullatt_block_indexes=list(spec.vision_fullatt_block_indexes), tokens_per_second=2,
    )
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids[prompts.IMAGE_PAD],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids[prompts.VISION_START],
        vision_end_token_id=ids[prompts.VISION_END], tie_word_embeddings=spec.tie_word_embeddings,
    )


def _sine_number_init(model: Any, tokenizer: Any, max_number: int) -> None:
    """Ordinal init: number n gets sin/cos features with periods from 2*max_number down to ~4 pixels."""
    import torch

    hidden = model.config.text_config.hidden_size
    ids = [tokenizer.convert_tokens_to_ids(str(n)) for n in range(max_number + 1)]
    n = torch.arange(max_number + 1, dtype=torch.float32)[:, None]
    k = torch.arange(hidden // 2, dtype=torch.float32)[None]
    freq = 2 * math.pi / (2.0 * max_number) * (max_number / 2.0) ** (k / (hidden // 2 - 1))
    feat = torch.cat([torch.sin(n * freq), torch.cos(n * freq)], 1) * 0.02 * math.sqrt(2)
    with torch.no_grad():
        model.get_input_embeddings().weight[ids] = feat
        if not model.config.tie_word_embeddings:
            model.get_output_embeddings().weight[ids] = feat


def build_tiny_model(out_dir: str | Path, *, preset: Preset = "test", seed: int = 0,
                     tie_word_embeddings: bool | None = None) -> Path:
    """Write a loadable tiny Qwen2.5-VL checkpoint directory and return its path.

    The directory holds config.json, model.safetensors, generation_config.json, tokenizer files, the
    processor config and chat_template.jinja. Deterministic for (preset, seed, tie_word_embeddings).
    ``tie_word_embeddings`` overrides the preset (converters must handle tied embeddings).
    """
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r} is unknown: use one of {sorted(PRESETS)}")
    spec = PRESETS[preset]
    if tie_word_embeddings is not None:
        spec = replace(spec, tie_word_embeddings=tie_word_embeddings)
    return build_model_dir(out_dir, spec, seed=seed)


def build_model_dir(out_dir: str | Path, spec: TinyModelSpec, *, seed: int = 0, vocab_size: int | None = None,
                    dtype: str = "float32", device: str = "cpu") -> Path:
    """A random Qwen2.5-VL of any ``spec`` with this module's tokenizer, as a checkpoint directory (see
    ``build_tiny_model``). ``vocab_size``: the embedding rows (default: the tokenizer's length rounded up to 64;
    a real model's 152064 gives its real output-layer cost). ``dtype`` / ``device``: where the random weights are
    drawn and how they are saved (a 7B-width model is drawn much faster on a GPU)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = build_config(tokenizer, spec)
    if vocab_size is not None:
        if vocab_size < len(tokenizer):
            raise ValueError(f"vocab_size={vocab_size} is below the tokenizer's {len(tokenizer)} tokens")
        config.text_config.vocab_size = vocab_size
    config._attn_implementation = "sdpa"
    on = torch.device(device)
    # Seed a private generator state: building assets must not disturb the caller's RNG stream.
    cuda = on.type == "cuda"
    fork = dict(devices=[on.index or 0], device_type="cuda") if cuda else dict(devices=[])
    with torch.random.fork_rng(**fork):
        torch.manual_seed(seed)  # seeds the CUDA generators too
        previous = torch.get_default_dtype()
        torch.set_default_dtype(getattr(torch, dtype))
        try:
            with on:
                model = Qwen2_5_VLForConditionalGeneration(config)
        finally:
            torch.set_default_dtype(previous)
        if spec.sine_number_init_max:
            _sine_number_init(model, tokenizer, spec.sine_number_init_max)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    build_processor(tokenizer, spec).save_pretrained(out)
    return out


def count_parameters(model: Any) -> int:
    """Number of distinct parameters (a tied lm_head is counted once)."""
    return sum(p.numel() for p in model.parameters())
