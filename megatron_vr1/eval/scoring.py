"""Detection confidence for generated boxes.

* ``constant``: every box scores 0.99, the paper's protocol for Qwen2.5-VL (generated boxes carry no confidence).
* ``logprob``: Griffon's ``accum_probs``: sqrt(product of the label tokens' probabilities) x sqrt(product of the
  coordinate tokens' probabilities). Griffon takes the max softmax probability at each position, which under
  greedy decoding is the probability of the emitted token, so here it is exp of the emitted tokens' logprobs.

Pure Python: token character offsets come from a ``decode(token_ids) -> str`` callable (the engine's tokenizer).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from megatron_vr1.eval.parse import ParsedBox

CONSTANT_SCORE = 0.99
SCORE_MODES: tuple[str, ...] = ("constant", "logprob")


def token_char_ends(token_ids: Sequence[int], decode: Callable[[list[int]], str]) -> list[int]:
    """End character offset of each token in ``decode(token_ids)``, from decoding growing prefixes.

    Prefix decoding is exact for byte-level BPE even when a character spans several tokens (the partial
    prefix decodes to a replacement char that is later completed); offsets are clamped to be non-decreasing.
    """
    ends, last = [], 0
    for k in range(1, len(token_ids) + 1):
        n = len(decode(list(token_ids[:k])).rstrip("\ufffd"))
        last = max(last, n)
        ends.append(last)
    return ends


def _span_logprob(span: tuple[int, int], ends: list[int], logprobs: Sequence[float]) -> float | None:
    """Sum of the logprobs of the tokens overlapping the character span [start, end), None if none overlap."""
    start, end = span
    total, hit, prev_end = 0.0, False, 0
    for tok_end, lp in zip(ends, logprobs):
        tok_start = prev_end
        prev_end = tok_end
        if tok_end > start and tok_start < end and tok_end > tok_start:
            total += lp
            hit = True
    return total if hit else None


def box_scores(boxes: Sequence[ParsedBox], mode: str, *, token_ids: Sequence[int] = (),
               logprobs: Sequence[float] = (), decode: Callable[[list[int]], str] | None = None) -> list[float]:
    """One confidence per parsed box.

    ``logprob`` mode needs the completion's token ids, their logprobs and the decoder. A box whose label or
    coordinate text cannot be located among the tokens falls back to the geometric mean token probability of
    the whole completion (documented deviation: Griffon's own splitter cannot fail this way).
    """
    if mode == "constant":
        return [CONSTANT_SCORE] * len(boxes)
    if mode != "logprob":
        raise ValueError(f"score mode {mode!r} is unknown; use one of {SCORE_MODES}")
    if not boxes:
        return []
    if decode is None or len(token_ids) != len(logprobs) or not token_ids:
        raise ValueError("logprob scores need the completion's token_ids, an equal number of logprobs and a decoder; "
                         "generate with return_logprob=True")
    ends = token_char_ends(token_ids, decode)
    fallback = math.exp(sum(logprobs) / len(logprobs))
    scores = []
    for b in boxes:
        lp_label = _span_logprob(b.label_span, ends, logprobs) if b.label_span else None
        lp_box = _span_logprob(b.box_span, ends, logprobs) if b.box_span else None
        if lp_label is None or lp_box is None:
            scores.append(fallback)
        else:
            scores.append(math.sqrt(math.exp(lp_label)) * math.sqrt(math.exp(lp_box)))
    return scores
