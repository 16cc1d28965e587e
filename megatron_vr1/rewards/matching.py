"""Box-prioritized one-to-one matching of predictions to ground truth, for a whole padded batch.

The optimum of the assignment problem is found without scipy when it is obvious: if P <= G and every
prediction's cheapest ground truth is a different one, taking those row minima is optimal (their sum is a
lower bound of any assignment that covers all rows); symmetrically for columns when P > G. That covers one
box on either side and almost every honest answer. The rest go to scipy's linear_sum_assignment, one small
matrix each, like the released ``BoxPriorMatcher``.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

_PAD_COST = 1e30


def _has_duplicates(choice: np.ndarray, valid: np.ndarray, n_choices: int) -> np.ndarray:
    """[B] True where two valid entries of a row of ``choice`` (values < n_choices) pick the same index."""
    b = choice.shape[0]
    rows = np.broadcast_to(np.arange(b)[:, None], choice.shape)
    hits = np.bincount((rows * n_choices + choice)[valid], minlength=b * n_choices)
    return hits.reshape(b, n_choices).max(axis=1) > 1


def match_batch(cost: np.ndarray, n_pred: np.ndarray, n_gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Optimal assignment per sample of a padded [B, P, G] cost array.

    Returns ``(matched, pred_of_gt)``: ``matched`` [B, G] marks ground truths that got a prediction
    (min(n_pred, n_gt) per sample) and ``pred_of_gt`` [B, G] gives its index (undefined where not matched).
    """
    b, p, g = cost.shape
    matched = np.zeros((b, g), dtype=bool)
    pred_of_gt = np.zeros((b, g), dtype=np.int64)
    if p == 0 or g == 0:
        return matched, pred_of_gt
    row_valid = np.arange(p)[None, :] < n_pred[:, None]
    col_valid = np.arange(g)[None, :] < n_gt[:, None]
    padded = np.where(row_valid[:, :, None] & col_valid[:, None, :], cost, _PAD_COST)
    active = (n_pred > 0) & (n_gt > 0)
    by_rows = active & (n_pred <= n_gt)
    by_cols = active & (n_pred > n_gt)

    row_choice = padded.argmin(axis=2)  # [B, P]: cheapest gt of each prediction
    col_choice = padded.argmin(axis=1)  # [B, G]: cheapest prediction of each gt
    rows_ok = by_rows & ~_has_duplicates(row_choice, row_valid, g)
    cols_ok = by_cols & ~_has_duplicates(col_choice, col_valid, p)

    bi, ri = np.nonzero(row_valid & rows_ok[:, None])
    ci = row_choice[bi, ri]
    matched[bi, ci] = True
    pred_of_gt[bi, ci] = ri
    bi, ci = np.nonzero(col_valid & cols_ok[:, None])
    matched[bi, ci] = True
    pred_of_gt[bi, ci] = col_choice[bi, ci]

    for i in np.nonzero(active & ~rows_ok & ~cols_ok)[0]:
        rows, cols = linear_sum_assignment(cost[i, : n_pred[i], : n_gt[i]])
        matched[i, cols] = True
        pred_of_gt[i, cols] = rows
    return matched, pred_of_gt
