"""3-D (temporal, height, width) M-RoPE position ids for Qwen2.5-VL image prompts.

Mirrors transformers 5.23's ``Qwen2_5_VLModel.get_rope_index`` for images, on purpose and pinned by a test:
text runs count up by one on all three axes; a run of ``<|image_pad|>`` tokens gets t = start,
h = start + row, w = start + column over the merged (grid_h/merge x grid_w/merge) grid, and the text after it
resumes at start + max(grid_h, grid_w)/merge. (transformers 5.3 doubles the temporal id of images: a bug;
sglang 0.5.10 agrees with 5.23 for images.) Videos are not supported.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from megatron_vr1.models.hf_config import _as_dict


def _vision_fields(hf_config: Any) -> tuple[int | None, int]:
    top = _as_dict(hf_config)
    vision = top.get("vision_config") or {}
    return top.get("image_token_id"), int(vision.get("spatial_merge_size", 2))


def mrope_position_ids(input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None, hf_config: Any,
                       attention_mask: torch.Tensor | None = None, return_deltas: bool = False):
    """Position ids [3, B, S] for ``input_ids`` [B, S] whose images have ``image_grid_thw`` [n_images, 3]
    (in order of appearance, over the whole batch). ``attention_mask`` [B, S] (1 = token) skips padding,
    whose positions stay 0 as in transformers. With ``return_deltas`` also returns [B, 1]:
    max position + 1 - number of tokens, the offset generation adds to later text positions."""
    image_token_id, merge = _vision_fields(hf_config)
    if input_ids.dim() != 2:
        raise ValueError(f"mrope_position_ids: input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    grids = iter(image_grid_thw.tolist() if image_grid_thw is not None else [])
    positions = torch.zeros(3, *input_ids.shape, dtype=torch.long, device=input_ids.device)
    deltas = []
    for b in range(input_ids.shape[0]):
        keep = attention_mask[b].bool() if attention_mask is not None else torch.ones_like(input_ids[b], dtype=torch.bool)
        ids = input_ids[b][keep].tolist()
        pieces, pos = [], 0
        for is_image, run in itertools.groupby(ids, key=lambda t: t == image_token_id):
            n = len(list(run))
            if not is_image:
                pieces.append(torch.arange(pos, pos + n).expand(3, n))
                pos += n
                continue
            try:
                t, h, w = next(grids)
            except StopIteration:
                raise ValueError(f"mrope_position_ids: row {b} has more <|image_pad|> runs than image_grid_thw "
                                 f"entries; pass one grid per image") from None
            gh, gw = h // merge, w // merge
            if t * gh * gw != n:
                raise ValueError(f"mrope_position_ids: row {b} has an image run of {n} <|image_pad|> tokens but its "
                                 f"grid {[t, h, w]} merges to {t * gh * gw}; the prompt and image_grid_thw disagree")
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
            pieces.append(torch.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]) + pos)
            pos += max(h, w) // merge
        row = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)
        positions[:, b, keep.to(positions.device)] = row.to(positions.device)
        deltas.append((int(row.max()) + 1 - len(ids)) if len(ids) else 0)
    if next(grids, None) is not None:
        raise ValueError("mrope_position_ids: image_grid_thw has more entries than <|image_pad|> runs in input_ids")
    if return_deltas:
        return positions, torch.tensor(deltas, device=input_ids.device).unsqueeze(1)
    return positions
