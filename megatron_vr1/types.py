"""Typed records passed between the stages of the loop.

prompts (data) -> Sample -> rollout engine -> Completion -> RolloutGroup -> rewards -> RewardBreakdown
-> advantages -> TrainBatch -> Megatron update.

This module imports only the standard library so that the pure packages (rewards, data, eval) can use
it without pulling in torch. Tensor-valued records (TrainBatch) annotate tensors as ``Any``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Box = tuple[float, float, float, float]
"""A box as (x1, y1, x2, y2) corners."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GroundTruth:
    """One ground-truth instance in original-image pixels."""

    label: str
    box: Box


@dataclass(frozen=True, slots=True, kw_only=True)
class Sample:
    """One localization query: an image, a prompt and its ground truth (a Vision-R1 dataset row).

    ``width``/``height`` are the original image size; ``input_width``/``input_height`` the size the model
    sees after Qwen2.5-VL's smart_resize (multiples of 28). Predicted boxes are in input pixels and are
    rescaled to the original image with these.
    """

    sample_id: str
    """Stable id (source file + row), used to de-duplicate completions across retries."""
    problem: str
    image: str | bytes
    """A path to the image file, or its encoded bytes."""
    solution: tuple[GroundTruth, ...]
    width: int
    height: int
    input_width: int
    input_height: int
    num_instances: int
    target_id_maps: dict[str, int]
    source: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Completion:
    """One generated answer for a Sample, as returned by a rollout engine."""

    sample_id: str
    request_id: str
    """Unique per (sample, group index, attempt-independent); the rollout client de-duplicates on it."""
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    """Rollout log-probabilities of ``token_ids`` (same length)."""
    finish_reason: str
    """"stop" or "length" (truncated at max_new_tokens) or "abort"."""
    weight_version: int
    prompt_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class RolloutGroup:
    """The G completions sampled for one Sample (GRPO's group)."""

    sample: Sample
    completions: tuple[Completion, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class RewardBreakdown:
    """Per-completion reward of the Vision-R1 criteria, float64, with diagnostics.

    ``total = format + recall + precision`` (range [0, 3]).
    """

    format: float
    recall: float
    precision: float
    total: float
    parse_status: str = "ok"
    """"ok", "empty", "fallback" (regex recovery of truncated JSON) or "unparsable"."""
    n_pred: int = 0
    n_gt: int = 0
    n_matched: int = 0
    mean_iou: float = 0.0
    n_tp: int = 0
    """Matched predictions whose overlap reaches the stage's true-positive threshold ξ0."""
    stage: str = ""
    """Refinement stage that scored it: "plain", "beginner" or "advanced"."""


@dataclass(slots=True, kw_only=True)
class TrainBatch:
    """What the Megatron update consumes: padded token tensors plus per-sequence scalars.

    Tensors are torch tensors; they are typed ``Any`` here so this module stays torch-free.
    """

    input_ids: Any
    """[B, S] prompt + completion token ids (right padded)."""
    loss_mask: Any
    """[B, S] 1.0 on completion tokens that enter the loss."""
    advantages: Any
    """[B] float32 advantage per sequence."""
    rollout_logprobs: Any
    """[B, S] rollout-engine log-probabilities aligned with input_ids (0 outside loss_mask)."""
    old_logprobs: Any = None
    ref_logprobs: Any = None
    pixel_values: Any = None
    image_grid_thw: Any = None
    weight_versions: list[int] = field(default_factory=list)
    lengths: Any = None
    """[B] int64 unpadded length (prompt + completion) of each row."""
    prompt_lengths: Any = None
    """[B] int64 prompt length of each row (the completion starts there)."""
    group_ids: Any = None
    """[B] int64 index of the row's rollout group: rows with one id share prompt and image (shared-prompt
    packing puts them in one row)."""
