"""The RolloutEngine protocol: what the trainer and the evaluator need from a generator.

Two implementations: ``rollout.sglang_engine`` (the SGLang HTTP server; the only module that knows SGLang)
and ``rollout.hf_engine`` (in-process transformers; the logprob reference and the fallback).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from megatron_vr1.types import Completion

IMAGE_PAD = "<|image_pad|>"
_IMAGE_PAD_RUN = re.compile(r"(?:<\|image_pad\|>)+")


def collapse_image_pads(prompt: str) -> str:
    """One ``<|image_pad|>`` per image. Prompts may arrive expanded (data.prompts.render_prompt writes one pad
    per vision token, as the trainer tokenises them); both engines' processors expand the placeholder themselves."""
    return _IMAGE_PAD_RUN.sub(IMAGE_PAD, prompt)


@dataclass(frozen=True, slots=True, kw_only=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    n: int = 1
    """Completions per request (GRPO's G)."""
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    """Generate exactly ``max_new_tokens`` tokens (fixed-length benchmarks and fault-injection tests)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationRequest:
    """One prompt with at most one image. ``request_id`` is unique; completions carry ``{request_id}-{i}``."""

    request_id: str
    sample_id: str
    prompt: str
    """The full chat-formatted prompt text, including the vision placeholder tokens."""
    image: str | bytes | None = None
    """A path, or encoded image bytes (PNG/JPEG)."""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    return_logprob: bool = True


@runtime_checkable
class RolloutEngine(Protocol):
    def generate(self, requests: list[GenerationRequest]) -> list[list[Completion]]:
        """One list of ``request.sampling.n`` completions per request, in request order."""
        ...

    @property
    def weight_version(self) -> int:
        """The version of the weights the engine generates with (monotonically increasing)."""
        ...

    def close(self) -> None:
        ...
