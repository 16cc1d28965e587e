"""Rollout groups + advantages -> TrainBatch: the tensors one Megatron update consumes.

Each row is prompt + completion token ids (right padded). The loss mask covers the completion tokens up to and
including the first EOS (the released trainer's completion mask); a completion cut at max_new_tokens keeps its
tokens unless overlong filtering masks it out. A completion that generated a vision token (``<|image_pad|>``
and friends, ``vision_ids``) cannot be replayed by the trainer, whose model scatters image features into every
image-pad position, so it is left out of the loss (transformers raises "image features and image tokens do not
match" on such rows). Rows left without any loss token are dropped: they carry no gradient and would only dilute
the per-sequence mean. Rollout logprobs sit at the position of the token they
score, aligned with ``input_ids``. A group's image is stored once (``pixel_values`` / ``image_grid_thw`` per group,
``group_ids`` per row): the G completions of a prompt share it, and so does everything that ships the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from megatron_vr1.types import RolloutGroup, Sample, TrainBatch


@dataclass(frozen=True, slots=True)
class PreparedPrompt:
    """A Sample as the model sees it: the chat prompt text, its token ids and the image tensors."""

    sample: Sample
    prompt: str
    """Chat text with ``<|image_pad|>`` expanded to one token per merged patch (what the engine receives)."""
    prompt_ids: tuple[int, ...]
    pixel_values: torch.Tensor
    """[patches, 1176] float32."""
    image_grid_thw: tuple[int, int, int]


def prepare_prompt(sample: Sample, tokenizer, *, min_pixels: int, max_pixels: int) -> PreparedPrompt:
    """The data package's model inputs (image patches + chat prompt) with the prompt tokenized."""
    from megatron_vr1.data.dataset import model_inputs

    inputs = model_inputs(sample, min_pixels=min_pixels, max_pixels=max_pixels)
    ids = tokenizer(inputs.prompt, add_special_tokens=False)["input_ids"]
    return PreparedPrompt(sample=sample, prompt=inputs.prompt, prompt_ids=tuple(ids),
                          pixel_values=torch.from_numpy(np.asarray(inputs.pixel_values, dtype=np.float32)),
                          image_grid_thw=tuple(int(v) for v in inputs.image_grid_thw))


def completion_mask_length(token_ids: Sequence[int], eos_ids: Sequence[int]) -> int:
    """Number of completion tokens in the loss: up to and including the first EOS, else all of them."""
    for k, t in enumerate(token_ids):
        if t in eos_ids:
            return k + 1
    return len(token_ids)


def build_train_batch(groups: Sequence[RolloutGroup], prompts: Sequence[PreparedPrompt], advantages: torch.Tensor,
                      *, eos_ids: Sequence[int], overlong_filter: bool = False, pad_id: int = 0,
                      vision_ids: Sequence[int] = ()) -> TrainBatch | None:
    """Flatten ``groups`` (advantages laid out group after group) into a TrainBatch; None when no row has a loss
    token. Raises when the engine's prompt ids disagree with ours (training would score a different prompt)."""
    rows = []
    k = 0
    for group_id, (group, prep) in enumerate(zip(groups, prompts, strict=True)):
        for c in group.completions:
            adv = float(advantages[k])
            k += 1
            if c.prompt_token_ids and tuple(c.prompt_token_ids) != prep.prompt_ids:
                raise ValueError(f"sample {prep.sample.sample_id}: the rollout engine tokenized the prompt into "
                                 f"{len(c.prompt_token_ids)} ids, the trainer into {len(prep.prompt_ids)}; use the "
                                 "same tokenizer, chat template and min/max pixels for both")
            n_loss = completion_mask_length(c.token_ids, eos_ids)
            if overlong_filter and c.finish_reason == "length":
                n_loss = 0
            if vision_ids and any(t in vision_ids for t in c.token_ids[:n_loss]):
                n_loss = 0
            if n_loss == 0:
                continue
            rows.append((prep, c, n_loss, adv, group_id))
    if k != len(advantages):
        raise ValueError(f"{len(advantages)} advantages for {k} completions: pass one per completion")
    if not rows:
        return None
    lengths = [len(p.prompt_ids) + n for p, _c, n, *_ in rows]
    kept_groups = sorted({r[4] for r in rows})  # groups left with at least one row, renumbered 0..n-1
    local_id = {g: i for i, g in enumerate(kept_groups)}
    group_prompt = {r[4]: r[0] for r in rows}
    width = max(lengths)
    b = len(rows)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((b, width), dtype=torch.float32)
    rollout_lp = torch.zeros((b, width), dtype=torch.float32)
    for i, (prep, c, n, *_) in enumerate(rows):
        p = len(prep.prompt_ids)
        input_ids[i, :p] = torch.tensor(prep.prompt_ids)
        input_ids[i, p:p + n] = torch.tensor(c.token_ids[:n])
        loss_mask[i, p:p + n] = 1.0
        if c.logprobs:
            rollout_lp[i, p:p + n] = torch.tensor(c.logprobs[:n], dtype=torch.float32)
    return TrainBatch(
        input_ids=input_ids, loss_mask=loss_mask, advantages=torch.tensor([r[3] for r in rows], dtype=torch.float32),
        rollout_logprobs=rollout_lp, pixel_values=torch.cat([group_prompt[g].pixel_values for g in kept_groups]),
        image_grid_thw=torch.tensor([list(group_prompt[g].image_grid_thw) for g in kept_groups]),
        weight_versions=[c.weight_version for _p, c, *_ in rows], lengths=torch.tensor(lengths),
        prompt_lengths=torch.tensor([len(p.prompt_ids) for p, *_ in rows]),
        group_ids=torch.tensor([local_id[r[4]] for r in rows]))


def image_offsets(batch: TrainBatch) -> list[int]:
    """Patch offsets of each group's image in ``batch.pixel_values`` (one more entry than images)."""
    grids = batch.image_grid_thw
    return torch.cat([torch.zeros(1, dtype=torch.long), grids.prod(dim=1).cumsum(0)]).tolist()


def row_images(batch: TrainBatch, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values, image_grid_thw) with one image per row of ``rows``, in order (an unpacked micro-batch)."""
    offsets = image_offsets(batch)
    groups = [int(batch.group_ids[r]) for r in rows]
    pixels = torch.cat([batch.pixel_values[offsets[g]:offsets[g + 1]] for g in groups])
    return pixels, batch.image_grid_thw[torch.tensor(groups)]


def select_rows(batch: TrainBatch, rows: Sequence[int]) -> TrainBatch:
    """The sub-batch of ``rows`` (in that order) with the images of their groups only, each once; groups are
    renumbered in order of first appearance. Per-token fields keep the batch's width."""
    index = torch.tensor(list(rows), dtype=torch.long)
    pick = lambda t: None if t is None else t.index_select(0, index)  # noqa: E731
    old_groups = list(dict.fromkeys(int(batch.group_ids[r]) for r in rows))
    renumber = {g: i for i, g in enumerate(old_groups)}
    pixels = grids = None
    if batch.image_grid_thw is not None:
        offsets = image_offsets(batch)
        pixels = torch.cat([batch.pixel_values[offsets[g]:offsets[g + 1]] for g in old_groups])
        grids = batch.image_grid_thw[torch.tensor(old_groups)]
    return TrainBatch(
        input_ids=pick(batch.input_ids), loss_mask=pick(batch.loss_mask), advantages=pick(batch.advantages),
        rollout_logprobs=pick(batch.rollout_logprobs), old_logprobs=pick(batch.old_logprobs),
        ref_logprobs=pick(batch.ref_logprobs), pixel_values=pixels, image_grid_thw=grids,
        weight_versions=[batch.weight_versions[r] for r in rows] if batch.weight_versions else [],
        lengths=pick(batch.lengths), prompt_lengths=pick(batch.prompt_lengths),
        group_ids=torch.tensor([renumber[int(batch.group_ids[r])] for r in rows]))


def sft_batch(prompts: Sequence[PreparedPrompt], targets: Sequence[Sequence[int]], *, pad_id: int = 0) -> TrainBatch:
    """Teacher-forcing rows: prompt + target ids, loss on the target (advantage 1 is unused by the SFT loss)."""
    from megatron_vr1.types import Completion, RolloutGroup

    groups = [RolloutGroup(sample=p.sample, completions=(Completion(
        sample_id=p.sample.sample_id, request_id=f"sft-{p.sample.sample_id}", text="", token_ids=tuple(t), logprobs=(),
        finish_reason="stop", weight_version=0),)) for p, t in zip(prompts, targets, strict=True)]
    batch = build_train_batch(groups, prompts, torch.ones(len(groups)), eos_ids=(), pad_id=pad_id)
    if batch is None:
        raise ValueError("sft_batch: every target is empty; SFT needs at least one target token")
    return batch
