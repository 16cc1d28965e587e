"""The released-eval parser, detection building and logprob scores, on hand-written answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from megatron_vr1.eval.coco_metrics import coco_metrics, validate_detections, validate_ground_truth
from megatron_vr1.eval.detections import AnswerCounts, answer_to_detections
from megatron_vr1.eval.parse import extract_fenced, parse_answer
from megatron_vr1.eval.queries import EvalQuery
from megatron_vr1.eval.scoring import box_scores, token_char_ends

FENCED = '```json\n[\n\t{"bbox_2d": [10, 20, 110, 220], "label": "dog"},\n\t{"bbox_2d": [5, 5, 50, 40], "label": "Cat"}\n]\n```'


def test_fenced_answer_parses_ok_with_spans():
    ans = parse_answer(FENCED)
    assert ans.status == "ok"
    assert [(b.label, b.box) for b in ans.boxes] == [("dog", (10.0, 20.0, 110.0, 220.0)), ("Cat", (5.0, 5.0, 50.0, 40.0))]
    assert FENCED[slice(*ans.boxes[0].box_span)] == "[10, 20, 110, 220]"
    assert FENCED[slice(*ans.boxes[1].label_span)] == "Cat"


def test_truncated_answer_is_repaired_like_the_released_eval():
    text = '```json\n[\n\t{"bbox_2d": [10, 20, 110, 220], "label": "dog"},\n\t{"bbox_2d": [5, 5, 5'
    ans = parse_answer(text)
    assert ans.status == "repaired"
    assert [b.label for b in ans.boxes] == ["dog"]


def test_text_after_fence_is_ignored_and_no_fence_is_accepted():
    assert extract_fenced("intro\n```json\n[1]\n```\ntrailing")[0] == "[1]\n"
    ans = parse_answer('[{"bbox_2d": [1, 2, 3, 4], "label": "a"}]')
    assert ans.status == "ok" and len(ans.boxes) == 1


@pytest.mark.parametrize("text", ["", "no boxes here", "```json\n[{'bbox_2d': [1, 2,", "```json\n{}\n```",
                                  "```json\n__import__('os').system('true')\n```", "x" * 300_000, "[" * 5000])
def test_malformed_answers_are_unparsable_never_raise(text):
    ans = parse_answer(text)
    assert ans.status == "unparsable" and ans.boxes == ()


def test_bad_items_are_skipped_and_counted():
    text = '```json\n[{"bbox_2d": [1, 2, 3], "label": "a"}, {"label": "b"}, {"bbox_2d": [1, 2, 3, 4], "label": "c"}, 7]\n```'
    ans = parse_answer(text)
    assert [b.label for b in ans.boxes] == ["c"] and ans.n_skipped_items == 3


def _query(**kw):
    base = dict(query_id="d/1", dataset="d", image_id=1, image="1.jpg", problem="p", width=640, height=480,
                input_width=320, input_height=240, categories=("dog", "cat"))
    return EvalQuery(**{**base, **kw})


def test_rescale_label_mapping_and_unknown_labels():
    text = ('```json\n[{"bbox_2d": [10, 20, 110, 220], "label": "Dog"}, {"bbox_2d": [0, 0, 5, 5], "label": "unicorn"},'
            ' {"bbox_2d": [50, 50, 40, 60], "label": "cat"}]\n```')
    dets, counts, _ = answer_to_detections(_query(), text, {"dog": 1, "cat": 2})
    assert dets == [{"image_id": 1, "category_id": 1, "bbox": [20.0, 40.0, 200.0, 400.0], "score": 0.99}]
    assert counts.n_unknown_label == 1 and counts.unknown_labels == {"unicorn": 1} and counts.n_degenerate == 1
    total = AnswerCounts()
    total.add(counts)
    total.add(answer_to_detections(_query(), "garbage", {"dog": 1})[1])
    assert total.n_queries == 2 and total.n_unparsable == 1 and total.n_boxes == 3


def test_hand_written_answers_give_known_map():
    """Three images, answers written by hand in input pixels (half the original size): AP must be what
    pycocotools computes on the equivalent hand-made detections, and exactly 1.0 for perfect answers."""
    gt = validate_ground_truth({
        "images": [{"id": i, "width": 640, "height": 480} for i in (1, 2, 3)],
        "categories": [{"id": 1, "name": "Dog"}, {"id": 2, "name": "cat"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [20, 40, 200, 400]},
            {"id": 2, "image_id": 2, "category_id": 2, "bbox": [100, 100, 100, 100]},
            {"id": 3, "image_id": 3, "category_id": 1, "bbox": [0, 0, 320, 240]},
            {"id": 4, "image_id": 3, "category_id": 2, "bbox": [400, 300, 100, 100]},
        ]})
    name_to_id = {c["name"].lower(): c["id"] for c in gt["categories"]}
    perfect = {1: '```json\n[{"bbox_2d": [10, 20, 110, 220], "label": "dog"}]\n```',
               2: '```json\n[{"bbox_2d": [50, 50, 100, 100], "label": "cat"}]\n```',
               3: '```json\n[{"bbox_2d": [0, 0, 160, 120], "label": "dog"}, {"bbox_2d": [200, 150, 250, 200], "label": "cat"}]\n```'}
    dets = []
    for image_id, text in perfect.items():
        dets += answer_to_detections(_query(image_id=image_id), text, name_to_id)[0]
    assert coco_metrics(gt, dets).stats["AP"] == pytest.approx(1.0)

    # Imperfect: image 2's cat shifted by 25 orig px (IoU 0.6), image 3's cat mislabeled, a truncated answer.
    imperfect = {1: perfect[1][:-5] + ', {"bbox_2d": [3',  # truncated inside a second item: repaired
                 2: '```json\n[{"bbox_2d": [62.5, 50, 112.5, 100], "label": "cat"}]\n```',
                 3: '```json\n[{"bbox_2d": [0, 0, 160, 120], "label": "dog"}, {"bbox_2d": [200, 150, 250, 200], "label": "dog"}]\n```'}
    dets = []
    for image_id, text in imperfect.items():
        dets += answer_to_detections(_query(image_id=image_id), text, name_to_id)[0]
    by_hand = [{"image_id": 1, "category_id": 1, "bbox": [20, 40, 200, 400], "score": 0.99},
               {"image_id": 2, "category_id": 2, "bbox": [125, 100, 100, 100], "score": 0.99},
               {"image_id": 3, "category_id": 1, "bbox": [0, 0, 320, 240], "score": 0.99},
               {"image_id": 3, "category_id": 1, "bbox": [400, 300, 100, 100], "score": 0.99}]
    ours = coco_metrics(gt, dets).stats
    ref = TestPycocotools.stats(gt, by_hand)
    np.testing.assert_allclose([ours[k] for k in ("AP", "AP50", "AP75", "AR100")], ref[[0, 1, 2, 8]], atol=1e-12)
    assert 0.0 < ours["AP"] < ours["AP50"] < 1.0


class TestPycocotools:
    @staticmethod
    def stats(gt, dets):
        import contextlib
        import io

        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        with contextlib.redirect_stdout(io.StringIO()):
            g = COCO()
            g.dataset = gt
            g.createIndex()
            ev = COCOeval(g, g.loadRes([dict(d) for d in dets]), "bbox")
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        return np.asarray(ev.stats)


def test_logprob_scores_follow_griffon_accum_probs():
    """With one character per token, the score is sqrt(prod p(label tokens)) * sqrt(prod p(coordinate tokens))."""
    text = '[{"bbox_2d": [1, 2, 3, 4], "label": "ab"}]'
    token_ids = list(range(len(text)))
    decode = lambda ids: "".join(text[i] for i in ids)  # noqa: E731 - a one-char-per-token tokenizer
    rng = np.random.default_rng(0)
    logprobs = list(-rng.uniform(0.01, 0.5, len(text)))
    ans = parse_answer(text)
    (score,) = box_scores(ans.boxes, "logprob", token_ids=token_ids, logprobs=logprobs, decode=decode)
    lab0, box0 = text.index('"ab"') + 1, text.index("[1,")
    lp_label = logprobs[lab0] + logprobs[lab0 + 1]
    lp_box = sum(logprobs[box0: box0 + len("[1, 2, 3, 4]")])
    assert score == pytest.approx(math.sqrt(math.exp(lp_label)) * math.sqrt(math.exp(lp_box)))
    assert box_scores(ans.boxes, "constant") == [0.99]


def test_token_char_ends_with_multi_token_characters():
    pieces = ["ab", "\ufffd", "é", "c"]  # a character split over two tokens decodes to U+FFFD until complete
    def decode(ids):
        out = "".join("" if pieces[i] == "\ufffd" else pieces[i] for i in ids)
        return out + ("\ufffd" if ids and pieces[ids[-1]] == "\ufffd" else "")
    assert token_char_ends([0, 1, 2, 3], decode) == [2, 2, 3, 4]
