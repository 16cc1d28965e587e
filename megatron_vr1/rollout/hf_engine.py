"""``HFEngine``: the RolloutEngine protocol in-process with transformers' Qwen2.5-VL.

It is the logprob reference for the SGLang engine and the Megatron policy, the fallback generator where SGLang
cannot be installed, and a stand-in server for weight-sync tests (``update_weights``).

Conventions (the same as the SGLang engine's):

* ``Completion.logprobs`` are the **raw model log-probabilities** of the emitted tokens: ``log_softmax`` of the
  unprocessed logits (temperature 1, no top-p), whatever sampling settings chose the token. This is what the
  trainer compares against its own forward pass.
* ``token_ids`` end with the stop token when generation stopped on EOS (``finish_reason="stop"``) and include
  its logprob; a completion cut by ``max_new_tokens`` has ``finish_reason="length"``.
* ``temperature == 0`` is greedy decoding.
* A request with a ``seed`` is generated on its own (its n copies in one batch) after seeding torch, so its
  output does not depend on the other requests of the call.

Workarounds for transformers 5.23 (found building the CPU demo): ``second_per_grid_ts`` is
always passed (batched rope-index bug), ``num_return_sequences`` is never used (inputs are expanded here), and
prompts are left padded.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from megatron_vr1.rollout.engine import GenerationRequest, SamplingParams, collapse_image_pads
from megatron_vr1.types import Completion

MAX_IMAGE_BYTES = 64 * 1024 * 1024
"""Refuse encoded images above 64 MiB (a 12800*28*28-pixel PNG is ~30 MB)."""


def _load_image(image: str | bytes | None, request_id: str):
    from PIL import Image

    if image is None:
        return None
    try:
        if isinstance(image, (bytes, bytearray)):
            if len(image) > MAX_IMAGE_BYTES:
                raise ValueError(f"request {request_id}: image is {len(image)} bytes, above the {MAX_IMAGE_BYTES} cap")
            return Image.open(io.BytesIO(image)).convert("RGB")
        path = Path(image)
        if path.stat().st_size > MAX_IMAGE_BYTES:
            raise ValueError(f"request {request_id}: image {path} is above the {MAX_IMAGE_BYTES} byte cap")
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise ValueError(f"request {request_id}: cannot read image {str(image)[:200]!r}: {e}") from None


def hub_to_module_name(name: str) -> str:
    """HF hub / safetensors parameter name -> transformers 5 module name for Qwen2.5-VL
    (``visual.*`` -> ``model.visual.*``, ``model.*`` -> ``model.language_model.*``); module names pass through."""
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model.") and not re.match(r"model\.(visual|language_model)\.", name):
        return "model.language_model." + name[len("model."):]
    return name


class HFEngine:
    """In-process generation with ``Qwen2_5_VLForConditionalGeneration`` loaded from an HF directory (safetensors)."""

    def __init__(self, model_dir: str | os.PathLike, *, dtype: str = "float32", device: str = "cpu",
                 min_pixels: int | None = None, max_pixels: int | None = None, max_batch_size: int = 16,
                 weight_version: int = 0) -> None:
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir} is not a Hugging Face model directory (no config.json); "
                                    "export a checkpoint with `megatron-vr1 convert mcore-to-hf` first.")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} is invalid: use a positive integer")
        self.device = torch.device(device)
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            model_dir, dtype=getattr(torch, dtype), use_safetensors=True, local_files_only=True,
            attn_implementation="sdpa").to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
        if min_pixels is not None or max_pixels is not None:
            # transformers 5.23 spells the pixel budget size={shortest_edge: min_pixels, longest_edge: max_pixels}
            # (min_pixels/max_pixels kwargs are deprecated); the other bound keeps the checkpoint's value.
            size = self.processor.image_processor.size
            self.processor = AutoProcessor.from_pretrained(
                model_dir, local_files_only=True,
                size={"shortest_edge": min_pixels if min_pixels is not None else size["shortest_edge"],
                      "longest_edge": max_pixels if max_pixels is not None else size["longest_edge"]})
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"  # decoder-only batches: prompts must end at the same position
        self.max_batch_size = max_batch_size
        self._weight_version = weight_version
        eos = self.model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos_ids = sorted(set(eos) | {self.tokenizer.eos_token_id} - {None})
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        # keep_vars: Parameters themselves, and tied weights under both names (lm_head.weight shares embed_tokens).
        self._params = dict(self.model.state_dict(keep_vars=True))

    # ---- RolloutEngine protocol -------------------------------------------------------------------------------

    @property
    def weight_version(self) -> int:
        return self._weight_version

    def close(self) -> None:
        self.model = None  # frees the weights; the engine is unusable afterwards

    def generate(self, requests: list[GenerationRequest]) -> list[list[Completion]]:
        """``request.sampling.n`` completions per request, in request order (see the module doc for conventions)."""
        results: dict[int, list[Completion]] = {}
        groups: dict[SamplingParams, list[int]] = {}
        for i, req in enumerate(requests):
            if req.sampling.seed is not None:
                torch.manual_seed(req.sampling.seed)
                results[i] = self._generate_group([req], req.sampling)[0]
            else:
                groups.setdefault(req.sampling, []).append(i)
        for sampling, idx in groups.items():
            per_chunk = max(1, self.max_batch_size // max(1, sampling.n))
            for start in range(0, len(idx), per_chunk):
                chunk = idx[start:start + per_chunk]
                for i, comps in zip(chunk, self._generate_group([requests[i] for i in chunk], sampling)):
                    results[i] = comps
        return [results[i] for i in range(len(requests))]

    # ---- helpers used by the evaluator and by parity tests -----------------------------------------------------

    def render_prompt(self, problem: str, with_image: bool = True) -> str:
        """The chat-formatted prompt of one user turn ``[image, text]`` with the generation prompt appended."""
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": problem}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=True)

    def decode(self, token_ids: Sequence[int]) -> str:
        """Token ids -> text exactly as ``Completion.text`` is made (special tokens skipped)."""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def input_size(self, image: str | bytes) -> tuple[int, int]:
        """(width, height) of the image as the model sees it (``image_grid_thw * 14``)."""
        grid = self.processor.image_processor(images=[_load_image(image, "input_size")], return_tensors="pt")
        _t, gh, gw = (int(v) for v in grid["image_grid_thw"][0])
        patch = self.processor.image_processor.patch_size
        return gw * patch, gh * patch

    @torch.no_grad()
    def teacher_forced_logprobs(self, prompt: str, image: str | bytes | None, completion_token_ids: Sequence[int],
                                temperature: float = 1.0) -> list[float]:
        """Log-probabilities of ``completion_token_ids`` after ``prompt`` under softmax(logits / temperature) (one
        forward pass, no sampling): what ``generate`` reports for tokens sampled at that temperature.

        A completion may contain the image-pad id (the model generated it); it is scored as the plain token it was
        when generated (``generate``, SGLang), not as a slot for image features."""
        inputs = self._encode([prompt], [_load_image(image, "teacher_forced")] if image is not None else None)
        completion = torch.tensor([list(completion_token_ids)], dtype=inputs["input_ids"].dtype, device=self.device)
        n_prompt = inputs["input_ids"].shape[1]
        inputs["input_ids"] = torch.cat([inputs["input_ids"], completion], dim=1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(completion)], dim=1)
        if "mm_token_type_ids" in inputs:
            inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(completion)], dim=1)
        if "pixel_values" in inputs and bool((completion == self.model.config.image_token_id).any()):
            inputs = self._embed_prompt_images_only(inputs, n_prompt)
        logits = self.model(**inputs, use_cache=False).logits[0, n_prompt - 1:-1].float() / temperature
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, completion[0, :, None])[:, 0]
        return logprobs.tolist()

    def _embed_prompt_images_only(self, inputs: dict[str, torch.Tensor], n_prompt: int) -> dict[str, torch.Tensor]:
        """Model inputs for a prompt with images followed by a completion that contains the image-pad id.

        transformers scatters image features into every image-pad position of ``input_ids`` and raises "Image
        features and image tokens do not match" when a generated pad makes one too many. Here the features go
        into the prompt's pad positions only, every other position keeps its token embedding, and the mrope
        positions come from the token types, which mark the completion as text: the same computation as the
        model's own forward for a completion without pads."""
        vl = self.model.model
        ids = inputs["input_ids"]
        embeds = vl.get_input_embeddings()(ids)
        features = vl.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
        features = torch.cat(features.pooler_output, dim=0).to(embeds.device, embeds.dtype)
        is_image = ids == self.model.config.image_token_id
        is_image[:, n_prompt:] = False
        if int(is_image.sum()) != features.shape[0]:
            raise ValueError(f"the prompt has {int(is_image.sum())} image-pad tokens for {features.shape[0]} image "
                             "features")
        embeds = embeds.masked_scatter(is_image[..., None], features)
        types = inputs.get("mm_token_type_ids")
        if types is None:
            types = is_image.long()
        position_ids, _ = vl.get_rope_index(ids, types, image_grid_thw=inputs["image_grid_thw"],
                                            second_per_grid_ts=inputs.get("second_per_grid_ts"),
                                            attention_mask=inputs["attention_mask"])
        return {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"], "position_ids": position_ids}

    # ---- weight updates ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> int:
        """Copy tensors (HF hub or module names) into the model and set ``weight_version``; returns the count.

        ``version`` must be above the current one. Unknown names or shape mismatches raise before the version
        changes (tensors already copied in this call stay copied, as with a partial SGLang update)."""
        if version <= self._weight_version:
            raise ValueError(f"weight version {version} is not above the current {self._weight_version}; "
                             "versions must increase monotonically")
        n = 0
        for name, tensor in named_tensors:
            target = self._params.get(hub_to_module_name(name))
            if target is None:
                raise KeyError(f"update_weights: {name!r} is not a parameter of this model")
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(f"update_weights: {name!r} has shape {tuple(tensor.shape)}, "
                                 f"the model expects {tuple(target.shape)}")
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))
            n += 1
        self._weight_version = version
        return n

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Replace every parameter (strict: all model parameters must be present) and set ``weight_version``."""
        given = {hub_to_module_name(k) for k in state_dict}
        missing = sorted(k for k, _ in self.model.named_parameters() if k not in given)
        if missing:
            raise KeyError(f"load_state_dict: {len(missing)} parameters missing, e.g. {missing[:3]}")
        self.update_weights(state_dict.items(), version)

    # ---- internals -------------------------------------------------------------------------------------------------

    def _encode(self, prompts: list[str], images: list[Any] | None) -> dict[str, torch.Tensor]:
        prompts = [collapse_image_pads(p) for p in prompts]
        inputs = self.processor(text=prompts, images=images, padding=True, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        if "image_grid_thw" in inputs:
            # transformers 5.23: without it, batched get_rope_index iterates over the sequence length.
            inputs["second_per_grid_ts"] = torch.ones(len(prompts), device=self.device)
        return inputs

    @torch.no_grad()
    def _generate_group(self, reqs: list[GenerationRequest], sampling: SamplingParams) -> list[list[Completion]]:
        n = sampling.n
        images = [_load_image(r.image, r.request_id) for r in reqs]
        if any(im is None for im in images) and not all(im is None for im in images):
            # the processor takes one image list per batch; mixed batches are split
            return [self._generate_group([r], sampling)[0] for r in reqs]
        prompts = [r.prompt for r in reqs for _ in range(n)]  # expand here, not with num_return_sequences
        batch_images = None if images[0] is None else [im for im in images for _ in range(n)]
        inputs = self._encode(prompts, batch_images)
        greedy = sampling.temperature == 0
        gen_kwargs: dict[str, Any] = dict(max_new_tokens=sampling.max_new_tokens, do_sample=not greedy,
                                          eos_token_id=self.eos_ids, pad_token_id=self.pad_id, output_logits=True,
                                          return_dict_in_generate=True, top_k=None)
        if not greedy:
            gen_kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        else:
            gen_kwargs.update(temperature=None, top_p=None)
        if sampling.ignore_eos:
            gen_kwargs.update(min_new_tokens=sampling.max_new_tokens)
        if sampling.stop:
            gen_kwargs.update(stop_strings=list(sampling.stop), tokenizer=self.tokenizer)
        out = self.model.generate(**inputs, **gen_kwargs)
        n_prompt = inputs["input_ids"].shape[1]
        new_tokens = out.sequences[:, n_prompt:]
        raw_logits = torch.stack(out.logits, dim=1).float()  # [B, T, V] unprocessed
        # Logprobs of the distribution sampled from, softmax(logits / T), as SGLang reports them (T = 1 when greedy).
        scale = 1.0 if greedy else float(sampling.temperature)
        token_logprobs = torch.log_softmax(raw_logits / scale, dim=-1).gather(-1, new_tokens[..., None])[..., 0]
        completions: list[list[Completion]] = []
        for r_idx, req in enumerate(reqs):
            group = []
            for j in range(n):
                row = r_idx * n + j
                ids = new_tokens[row].tolist()
                length, reason = self._finish(ids, sampling)
                prompt_ids = inputs["input_ids"][row][inputs["attention_mask"][row].bool()].tolist()
                group.append(Completion(
                    sample_id=req.sample_id, request_id=f"{req.request_id}-{j}", text=self.decode(ids[:length]),
                    token_ids=tuple(ids[:length]),
                    logprobs=tuple(token_logprobs[row, :length].tolist()) if req.return_logprob else (),
                    finish_reason=reason, weight_version=self._weight_version, prompt_token_ids=tuple(prompt_ids)))
            completions.append(group)
        return completions

    def _finish(self, ids: list[int], sampling: SamplingParams) -> tuple[int, str]:
        """(number of tokens that belong to the completion, finish reason)."""
        if sampling.ignore_eos:
            return len(ids), "length"
        for k, t in enumerate(ids):
            if t in self.eos_ids:
                return k + 1, "stop"
        if sampling.stop:
            for k in range(1, len(ids) + 1):
                if any(s in self.decode(ids[:k]) for s in sampling.stop):
                    return k, "stop"
        return len(ids), "length"
