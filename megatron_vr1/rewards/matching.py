"""Box-prioritized one-to-one matching of predictions to ground truth, for a whole batch.

Like the released ``BoxPriorMatcher``, scipy's linear_sum_assignment solves every sample with several
predictions and several ground truths, each on its own block (cut from one transposed copy of the batch's
cost). A sample with one prediction or one ground truth needs no solver: the optimum takes the (first)
cheapest partner.

A batched proof that the greedy assignment is the unique optimum (each item's strictly cheapest partner,
no two alike) was measured and dropped: at 64 completions x 10 boxes it costs about as much as the solver
calls it saves, and a third of policy-like answers (a missed box, an extra box) fail it anyway.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

_ZERO = np.zeros(1, dtype=np.int64)


def match_padded(cost: np.ndarray, n_pred: np.ndarray, n_gt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Optimal assignment of each sample of a padded [P, G, B] cost array (sample ``i``: the top-left
    ``n_pred[i] x n_gt[i]`` corner of ``cost[:, :, i]``).

    Returns ``(sample, pred, gt)``: one int64 entry per matched pair (min(n_pred, n_gt) per sample, in
    sample order).
    """
    per_sample = np.ascontiguousarray(cost.transpose(2, 0, 1))  # one copy, then a view per sample
    preds, gts = [], []
    for i, (p, g) in enumerate(zip(n_pred.tolist(), n_gt.tolist())):
        if p == 0 or g == 0:
            continue
        if p == 1:  # the single prediction takes its (first) cheapest ground truth
            preds.append(_ZERO)
            gts.append(per_sample[i, 0, :g].argmin(keepdims=True))
        elif g == 1:  # the single ground truth takes its (first) cheapest prediction
            preds.append(per_sample[i, :p, 0].argmin(keepdims=True))
            gts.append(_ZERO)
        else:
            rows, cols = linear_sum_assignment(per_sample[i, :p, :g])
            preds.append(rows)
            gts.append(cols)
    sample = np.repeat(np.arange(len(n_pred)), np.minimum(n_pred, n_gt))
    if not preds:
        return sample, sample, sample
    return sample, np.concatenate(preds), np.concatenate(gts)
