"""Prompt templates (Vision-R1 supplementary Table 8), Qwen2.5-VL chat rendering and the SFT target format.

Pure Python: the chat rendering reproduces what ``Qwen2_5_VLProcessor.apply_chat_template`` followed by the
processor's image-token expansion produces, without importing transformers (tested for equality).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Literal

from megatron_vr1.types import Sample

PromptTemplate = Literal["qwen25vl", "griffon"]
Task = Literal["detection", "grounding", "rec"]

SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
"""Qwen2.5-VL's special tokens; their position in this tuple is their token id (0..13)."""

IMAGE_PAD = "<|image_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
DEFAULT_SYSTEM = "You are a helpful assistant."

# Qwen2.5-VL's own chat template (as shipped with Qwen/Qwen2.5-VL-*-Instruct); kept verbatim so SGLang and
# transformers render prompts exactly as they do for the real model.
QWEN25VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TEMPLATES: dict[str, dict[str, str]] = {
    "qwen25vl": {
        "detection": ("Locate every item from the category list in the image and output the coordinates in JSON "
                      "format. The category set includes {categories}."),
        "grounding": "Locate every {category} in the image and output the coordinates in JSON format.",
        "rec": "Locate every {category} in the image and output the coordinates in JSON format.",
    },
    "griffon": {
        "detection": ("Examine the image for any objects from the category set. Report the coordinates of each "
                      "detected object. The category set includes {categories}."),
        "grounding": "Locate the exact position of {category} in the picture, if you can.",
        "rec": "Can you point out {category} in the image and provide the coordinates of its location?",
    },
}
"""Supplementary Table 8: {categories} is a ", "-joined list; {category} a category or referring expression."""


def _template(template: str, task: str) -> str:
    if template not in TEMPLATES:
        raise ValueError(f"prompt template {template!r} is unknown: use one of {sorted(TEMPLATES)}")
    return TEMPLATES[template][task]


def detection_prompt(categories: Sequence[str], template: PromptTemplate = "qwen25vl") -> str:
    """The detection query listing every category (one query per image, as the paper does for COCO)."""
    return _template(template, "detection").format(categories=", ".join(categories))


def grounding_prompt(category: str, template: PromptTemplate = "qwen25vl") -> str:
    """The visual-grounding query for one category (ODinW-style: one query per image x present category)."""
    return _template(template, "grounding").format(category=category)


def rec_prompt(expression: str, template: PromptTemplate = "qwen25vl") -> str:
    """The referring-expression query (the Qwen template is the grounding one, as in Table 8)."""
    return _template(template, "rec").format(category=expression)


def num_image_tokens(image_grid_thw: Sequence[int], merge_size: int = 2) -> int:
    """LLM tokens one image occupies: t*h*w patches merged merge_size x merge_size."""
    t, h, w = (int(v) for v in image_grid_thw)
    if h % merge_size or w % merge_size:
        raise ValueError(f"image_grid_thw={list(image_grid_thw)}: h and w must be multiples of merge_size={merge_size}")
    return t * h * w // (merge_size * merge_size)


def render_prompt(problem: str, image_grid_thw: Sequence[int], *, merge_size: int = 2,
                  system: str | None = DEFAULT_SYSTEM) -> str:
    """The chat text of one user turn ``[image, problem]`` with the generation prompt appended.

    Identical to ``processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
    {"type": "text", "text": problem}]}], add_generation_prompt=True)`` after the processor expanded
    ``<|image_pad|>`` to one token per merged patch. ``system=None`` drops the system turn (the Qwen
    template inserts the default one when the conversation does not start with a system message).
    """
    pads = IMAGE_PAD * num_image_tokens(image_grid_thw, merge_size)
    head = f"{IM_START}system\n{system}{IM_END}\n" if system is not None else ""
    return f"{head}{IM_START}user\n{VISION_START}{pads}{VISION_END}{problem}{IM_END}\n{IM_START}assistant\n"


def sft_target(objects: Iterable[tuple[str, Sequence[float]]]) -> str:
    """The SFT answer of §3.6: a fenced JSON list, one ``{"bbox_2d": [...], "label": ...}`` per line.

    ``objects`` are (label, (x1, y1, x2, y2)) in resized-input pixels; coordinates are rounded to integers
    as in the released SFT collator. An empty list (negative sample) renders as ```` ```json\\n[]\\n``` ````.
    """
    items = [f'{{"bbox_2d": [{", ".join(str(int(round(v))) for v in box)}], "label": {json.dumps(label)}}}'
             for label, box in objects]
    if not items:
        return "```json\n[]\n```"
    return "```json\n[\n\t" + ",\n\t".join(items) + "\n]\n```"


def sample_sft_target(sample: Sample) -> str:
    """The SFT answer of a Sample: its ground truth rescaled from original to resized-input pixels."""
    sx, sy = sample.input_width / sample.width, sample.input_height / sample.height
    return sft_target((g.label, (g.box[0] * sx, g.box[1] * sy, g.box[2] * sx, g.box[3] * sy))
                      for g in sample.solution)
