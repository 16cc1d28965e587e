"""Every JSON body we send to SGLang, built by pure functions (stdlib only).

Each builder mirrors one request dataclass of ``sglang.srt.managers.io_struct`` (0.5.10.post1);
tests/unit/test_sglang_payloads.py feeds every one of them to SGLang's own dataclass, so a field SGLang renames
fails a unit test instead of a training run.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_IMAGE_BYTES = 64 << 20
"""An image larger than this is refused before it is base64-encoded into a request."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerateItem:
    """What one /generate entry asks for: a single completion (``n == 1``, the id is ``rid``) or, with SGLang's
    parallel sampling, ``n`` completions of one prompt whose ids are ``result_ids``."""

    rid: str
    prompt: str
    image: str | bytes | None
    temperature: float
    top_p: float
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    seed: int | None = None
    return_logprob: bool = True
    ignore_eos: bool = False
    n: int = 1
    result_ids: tuple[str, ...] = ()
    """The ids of the ``n`` completions, in SGLang's output order; empty means ``(rid,)`` (n == 1)."""

    def __post_init__(self) -> None:
        if self.n < 1 or (self.n > 1 and len(self.result_ids) != self.n) or (self.n == 1 and self.result_ids
                                                                              not in ((), (self.rid,))):
            raise ValueError(f"GenerateItem {self.rid!r}: n={self.n} needs n result ids, got {self.result_ids!r}")
        if self.n > 1 and self.seed is not None:
            raise ValueError(f"GenerateItem {self.rid!r}: a seeded request would give {self.n} identical samples "
                             "under SGLang's parallel sampling; expand it into n seeded items instead")

    @property
    def ids(self) -> tuple[str, ...]:
        return self.result_ids or (self.rid,)


def image_field(image: str | bytes | None, *, inline: bool) -> str | None:
    """SGLang's ``image_data`` for one prompt: a file path, or a base64 data URL.

    ``inline=True`` reads a path and sends its bytes, so a server on another host can use it.
    """
    if image is None:
        return None
    if isinstance(image, str) and not inline:
        return image
    if isinstance(image, str):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image {image!r} does not exist; fix the sample's image path")
        if path.stat().st_size > MAX_IMAGE_BYTES:
            raise ValueError(f"image {image!r} is larger than {MAX_IMAGE_BYTES >> 20} MB; downscale it")
        image = path.read_bytes()
    if len(image) > MAX_IMAGE_BYTES:
        raise ValueError(f"an inline image is larger than {MAX_IMAGE_BYTES >> 20} MB; downscale it")
    return "data:image/png;base64," + base64.b64encode(image).decode()


def sampling_params(item: GenerateItem) -> dict[str, Any]:
    """SGLang sampling parameters (sampling/sampling_params.py) of one item."""
    params: dict[str, Any] = {"temperature": item.temperature, "top_p": item.top_p,
                              "max_new_tokens": item.max_new_tokens}
    if item.n > 1:
        params["n"] = item.n
    if item.stop:
        params["stop"] = list(item.stop)
    if item.seed is not None:
        params["sampling_seed"] = item.seed
    if item.ignore_eos:
        params["ignore_eos"] = True
    return params


def generate_payload(items: list[GenerateItem], *, inline_images: bool = True) -> dict[str, Any]:
    """A batched /generate body (GenerateReqInput): one entry per item, request ids included.

    SGLang reuses ``rid`` as the completion's meta_info id, which is how results are matched to items and
    why nothing is counted twice when a batch is retried.
    """
    if not items:
        raise ValueError("generate_payload needs at least one item")
    if any(it.n > 1 for it in items):
        if len(items) != 1:
            raise ValueError("a parallel-sampling item (n > 1) is sent on its own: SGLang warms the prefix of each "
                             "prompt of a batch one after the other")
        return group_payload(items[0], inline_images=inline_images)
    payload: dict[str, Any] = {
        "text": [it.prompt for it in items],
        "rid": [it.rid for it in items],
        "sampling_params": [sampling_params(it) for it in items],
        "return_logprob": [it.return_logprob for it in items],
        "stream": False,
    }
    images = [image_field(it.image, inline=inline_images) for it in items]
    if any(img is not None for img in images):
        payload["image_data"] = images
    return payload


def group_payload(item: GenerateItem, *, inline_images: bool = True) -> dict[str, Any]:
    """A single-prompt /generate body with ``n`` samples (SGLang's parallel sampling): the prompt and its image
    are processed and prefilled once, then ``n`` copies decode from the cached prefix. SGLang answers with a
    list of ``n`` results in order and its own request ids, so results are matched by position."""
    # A batch of one: SGLang takes list-valued logprob flags only without n, so return_logprob stays a bool.
    payload: dict[str, Any] = {"text": [item.prompt], "rid": [item.rid], "sampling_params": [sampling_params(item)],
                               "return_logprob": item.return_logprob, "stream": False}
    image = image_field(item.image, inline=inline_images)
    if image is not None:
        payload["image_data"] = [image]
    return payload


def flush_cache_payload() -> dict[str, Any]:
    return {}


def pause_generation_payload(mode: str = "abort") -> dict[str, Any]:
    """PauseGenerationReqInput. "abort" returns running requests (the engine resubmits them) so that the cache
    can be flushed; "in_place" would refuse the flush while requests run."""
    return {"mode": mode}


def continue_generation_payload() -> dict[str, Any]:
    return {}


def update_from_tensor_payload(serialized: list[str], *, version: int, flattened: bool,
                               flush_cache: bool = True) -> dict[str, Any]:
    """UpdateWeightsFromTensorReqInput: one serialized bucket per TP rank of the server."""
    return {"serialized_named_tensors": serialized, "load_format": "flattened_bucket" if flattened else None,
            "flush_cache": flush_cache, "abort_all_requests": False, "weight_version": str(version)}


def init_group_payload(*, master_address: str, master_port: int, rank_offset: int, world_size: int,
                       group_name: str, backend: str) -> dict[str, Any]:
    """InitWeightsUpdateGroupReqInput (the server ranks join at ``rank_offset``; the trainer is rank 0)."""
    return {"master_address": master_address, "master_port": master_port, "rank_offset": rank_offset,
            "world_size": world_size, "group_name": group_name, "backend": backend}


def update_from_distributed_payload(*, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                    group_name: str, version: int, flattened: bool,
                                    flush_cache: bool = True) -> dict[str, Any]:
    """UpdateWeightsFromDistributedReqInput: the metadata of tensors the trainer broadcasts next."""
    return {"names": names, "dtypes": dtypes, "shapes": shapes, "group_name": group_name,
            "flush_cache": flush_cache, "abort_all_requests": False, "weight_version": str(version),
            "load_format": "flattened_bucket" if flattened else None}


def destroy_group_payload(group_name: str) -> dict[str, Any]:
    return {"group_name": group_name}


def update_from_disk_payload(model_path: str, *, version: int, flush_cache: bool = True) -> dict[str, Any]:
    """UpdateWeightFromDiskReqInput: reload a HF checkpoint directory in place."""
    return {"model_path": model_path, "load_format": None, "abort_all_requests": False,
            "weight_version": str(version), "flush_cache": flush_cache}


def update_weight_version_payload(version: int) -> dict[str, Any]:
    """UpdateWeightVersionReqInput: stamp the version after every bucket has landed (requests keep running)."""
    return {"new_version": str(version), "abort_all_requests": False}


def memory_payload(tags: list[str] | None = None) -> dict[str, Any]:
    """Release/ResumeMemoryOccupationReqInput (GPU only: the CPU server crashes on them)."""
    return {"tags": tags}
