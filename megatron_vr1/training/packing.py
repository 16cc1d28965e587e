"""Shared-prompt packing: a group's completions behind one copy of their prompt (``parallel.pack_groups``).

The G completions of a GRPO group share their prompt, image included. Unpacked, every row repeats it, so the
vision tower and the prompt's tokens run G times per group; on the CPU demo (a 58-token prompt, ~20-token answers,
G = 8) the prompt was 70% of the tokens of an update. Packed, one row holds

    [ prompt | completion 1 | completion 2 | ... | completion G | pad ]

with an attention mask under which each completion sees the prompt and its own earlier tokens only, and
M-RoPE positions under which every completion starts where the prompt ends (the unpacked row's own positions, so
the two layouts compute the same function). A completion's first token is predicted by the prompt's last
position, its later tokens by its own previous token; ``score_index`` picks those positions' logits, so the loss
sees [completions, tokens] tensors exactly as in the unpacked layout.

Exact up to floating-point summation order (pinned by tests against the unpacked layout). Needs an attention
that takes an arbitrary mask: megatron's local spec (unfused attention on CPU, torch SDPA on GPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from megatron_vr1.types import TrainBatch


@dataclass(frozen=True, slots=True)
class PackedRows:
    """Model inputs of packed rows plus where each completion token is scored."""

    input_ids: torch.Tensor
    """[R, S] one row per group: prompt, then each completion, right-padded."""
    position_ids: torch.Tensor
    """[3, R, S] M-RoPE positions (pads 0)."""
    attention_mask: torch.Tensor
    """[R, 1, S, S] megatron's bool mask (True = masked)."""
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    rows: list[int]
    """The batch rows (completions) in scoring order."""
    score_index: torch.Tensor
    """[k, L] flat index into the [R * S] positions whose logits predict each completion token."""
    targets: torch.Tensor
    """[k, L] the completion tokens."""
    loss_mask: torch.Tensor
    """[k, L] the batch's loss mask of each token (0 past a completion's end)."""
    token_index: torch.Tensor
    """[k, L] each token's position in its batch row (to read per-token batch values and write results back)."""


def group_rows(batch: TrainBatch, rows: list[int]) -> list[list[int]]:
    """``rows`` grouped by ``batch.group_ids`` (groups in order of first appearance, rows in given order)."""
    if batch.group_ids is None or batch.prompt_lengths is None:
        raise ValueError("parallel.pack_groups needs a TrainBatch with group_ids and prompt_lengths "
                         "(build it with build_train_batch)")
    groups: dict[int, list[int]] = {}
    for r in rows:
        groups.setdefault(int(batch.group_ids[r]), []).append(r)
    return list(groups.values())


def pack_groups(batch: TrainBatch, groups: list[list[int]], hf_config: Any, *, pad_id: int = 0,
                length_multiple: int = 1) -> PackedRows:
    """Pack each list of batch rows in ``groups`` (rows sharing one prompt and image) into one row.

    ``length_multiple``: pad the packed length to a multiple of it (sequence parallelism splits the sequence over
    the TP ranks).
    """
    from megatron_vr1.models.mrope import mrope_position_ids
    from megatron_vr1.training.batch import row_images

    grids = batch.image_grid_thw
    packed_ids, packed_pos, segments, prompt_lens = [], [], [], []
    for members in groups:
        first = members[0]
        p = int(batch.prompt_lengths[first])
        prompt = batch.input_ids[first, :p]
        ids, pos, seg = [prompt], [], [torch.zeros(p, dtype=torch.long)]
        for i, r in enumerate(members):
            n = int(batch.lengths[r])
            if int(batch.prompt_lengths[r]) != p or not torch.equal(batch.input_ids[r, :p], prompt) or \
                    int(batch.group_ids[r]) != int(batch.group_ids[first]):
                raise ValueError(f"pack_groups: batch row {r} is in group {int(batch.group_ids[r])} but its prompt "
                                 f"differs from row {first}'s; rows of one group must share prompt and image")
            # The unpacked row's own positions: the completion continues the prompt exactly as it would alone.
            thw = grids[int(batch.group_ids[r])][None] if grids is not None else None
            row_pos = mrope_position_ids(batch.input_ids[r:r + 1, :n], thw, hf_config)[:, 0]  # [3, n]
            if i == 0:
                pos.append(row_pos[:, :p])
            ids.append(batch.input_ids[r, p:n])
            pos.append(row_pos[:, p:n])
            seg.append(torch.full((n - p,), i + 1, dtype=torch.long))
        packed_ids.append(torch.cat(ids))
        packed_pos.append(torch.cat(pos, dim=1))
        segments.append(torch.cat(seg))
        prompt_lens.append(p)

    width = max(len(t) for t in packed_ids)
    width = -(-width // length_multiple) * length_multiple
    n_rows = len(groups)
    input_ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((3, n_rows, width), dtype=torch.long)
    seg_ids = torch.full((n_rows, width), -1, dtype=torch.long)  # -1: padding
    for g, (ids, pos, seg) in enumerate(zip(packed_ids, packed_pos, segments)):
        input_ids[g, :len(ids)] = ids
        position_ids[:, g, :len(ids)] = pos
        seg_ids[g, :len(seg)] = seg
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = (seg_ids[:, :, None] == seg_ids[:, None, :]) & (seg_ids[:, None, :] > 0)
    allowed = causal[None] & ((seg_ids[:, None, :] == 0) | same)
    allowed |= torch.eye(width, dtype=torch.bool)[None]  # pad queries keep a finite softmax (outputs unused)
    attention_mask = (~allowed)[:, None]

    # Where each completion token is scored: token j of a completion starting at packed position s is predicted
    # by position p - 1 (the prompt's last) for j = 0, else by s + j - 1.
    order = [r for members in groups for r in members]
    n_tok = [int(batch.lengths[r]) - int(batch.prompt_lengths[r]) for r in order]
    width_tok = max(n_tok)
    k = len(order)
    score_index = torch.zeros((k, width_tok), dtype=torch.long)
    targets = torch.zeros((k, width_tok), dtype=torch.long)
    loss_mask = torch.zeros((k, width_tok), dtype=torch.float32)
    token_index = torch.zeros((k, width_tok), dtype=torch.long)
    c = 0
    for g, members in enumerate(groups):
        p, start = prompt_lens[g], prompt_lens[g]
        for r in members:
            n = int(batch.lengths[r]) - p
            j = torch.arange(n)
            predictor = torch.where(j == 0, torch.full_like(j, p - 1), start + j - 1)
            score_index[c, :n] = g * width + predictor
            targets[c, :n] = input_ids[g, start:start + n]
            loss_mask[c, :n] = batch.loss_mask[r, p:p + n]
            token_index[c, :n] = p + j
            start += n
            c += 1
    pixel_values = image_grid_thw = None
    if grids is not None:  # one image per packed row: its group's
        pixel_values, image_grid_thw = row_images(batch, [members[0] for members in groups])
    return PackedRows(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                      pixel_values=pixel_values, image_grid_thw=image_grid_thw, rows=order, score_index=score_index,
                      targets=targets, loss_mask=loss_mask, token_index=token_index)


def scored_logits(logits: torch.Tensor, score_index: torch.Tensor) -> torch.Tensor:
    """[R, S, V] logits of packed rows -> [k, L, V]: the logits that predict each completion token."""
    flat = logits.reshape(-1, logits.shape[-1])
    return flat.index_select(0, score_index.reshape(-1)).reshape(*score_index.shape, logits.shape[-1])
