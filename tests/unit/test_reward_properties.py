"""Property tests (hypothesis): no exception on any text, criteria in range, permutation invariance, and a
perfect answer scores the maximum under the paper preset."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_vr1.config.reward import RewardConfig
from megatron_vr1.rewards import score_batch, target_from_row

PRESETS = [RewardConfig(preset="official"), RewardConfig(preset="paper"),
           RewardConfig(preset="official", coordinates="normalized_1000", precision_denominator="all_predictions"),
           RewardConfig(preset="paper", output_format="griffon_text")]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _row(boxes, n_inst=None, iw=644, ih=476):
    sol = [[lb, [list(b)]] for lb, b in boxes]
    return dict(solution=json.dumps(sol), width=640, height=480, input_width=iw, input_height=ih,
                target_id_maps='{"person": 1, "car": 2, "dog": 3}', num_instances=len(sol) if n_inst is None else n_inst)


ROWS = [_row([("person", (10, 10, 110, 210)), ("car", (200, 50, 400, 150))]), _row([]),
        _row([("dog", (0, 0, 640, 480))])]

coord = st.one_of(st.integers(-50, 1100), st.floats(-50, 1100, allow_nan=False), st.just(1000))
item = st.fixed_dictionaries({"bbox_2d": st.lists(coord, min_size=3, max_size=5),
                              "label": st.sampled_from(["person", "car", "dog", "PERSON ", "cat", ""])})
json_answer = st.lists(st.one_of(item, st.integers(), st.text(max_size=5)), max_size=12).map(json.dumps)
fenced = json_answer.map(lambda s: f"```json\n{s}\n```")
truncated = st.tuples(fenced, st.floats(0, 1)).map(lambda t: t[0][: int(len(t[0]) * t[1])])
griffon = st.lists(st.tuples(st.sampled_from(["person", "car"]), st.lists(st.floats(0, 1.2), min_size=4, max_size=4)),
                   max_size=6).map(lambda xs: " & ".join(f"{lb}-[{','.join(f'{c:.3f}' for c in cs)}]" for lb, cs in xs))
any_text = st.one_of(st.text(max_size=300), json_answer, fenced, truncated, griffon)


@SETTINGS
@given(texts=st.lists(any_text, min_size=1, max_size=6), step=st.sampled_from([None, 0, 1499, 1500, 5000]),
       row=st.sampled_from(ROWS))
def test_any_text_scores_in_range(texts, step, row):
    from megatron_vr1.rewards import RefinementSchedule
    target = target_from_row(row)
    for cfg in PRESETS:
        sched = RefinementSchedule.from_config(cfg, total_steps=3000)
        for out in score_batch(texts, [target] * len(texts), cfg, step, schedule=sched):
            for v in (out.format, out.recall, out.precision):
                assert 0.0 <= v <= 1.0
            assert 0.0 <= out.total <= 3.0
            assert out.total == out.format + out.recall + out.precision or cfg.rules().total == "mean"


@SETTINGS
@given(items=st.lists(st.tuples(st.lists(st.integers(0, 640), min_size=4, max_size=4),
                                st.sampled_from(["person", "car", "dog", "x"])), min_size=1, max_size=10),
       perm_seed=st.randoms(use_true_random=False), step=st.sampled_from([None, 0, 2000]))
def test_permuting_predictions_does_not_change_the_reward(items, perm_seed, step):
    answer = [{"bbox_2d": b, "label": lb} for b, lb in items]
    shuffled = list(answer)
    perm_seed.shuffle(shuffled)
    from megatron_vr1.rewards import RefinementSchedule
    target = target_from_row(ROWS[0])
    for cfg in PRESETS[:3]:
        sched = RefinementSchedule.from_config(cfg, total_steps=3000)
        a, b = score_batch([json.dumps(answer), json.dumps(shuffled)], [target] * 2, cfg, step, schedule=sched)
        assert (a.format, a.recall, a.precision, a.total) == (b.format, b.recall, b.precision, b.total)


@SETTINGS
@given(boxes=st.lists(st.tuples(st.integers(0, 300), st.integers(0, 200), st.integers(20, 300),
                                st.integers(20, 250), st.sampled_from(["person", "car", "dog"])), min_size=1,
                      max_size=12),
       step=st.sampled_from([None, 0, 10, 99]))
def test_perfect_answer_scores_the_maximum_under_paper(boxes, step):
    from megatron_vr1.rewards import RefinementSchedule
    gt = [(lb, (x, y, x + w, y + h)) for x, y, w, h, lb in boxes]
    # input size == image size: the model's integer pixels are exactly the ground truth.
    row = _row(gt, iw=640, ih=480)
    answer = json.dumps([{"bbox_2d": list(b), "label": lb} for lb, b in gt])
    cfg = RewardConfig(preset="paper")
    out, = score_batch([f"```json\n{answer}\n```"], [target_from_row(row)], cfg, step,
                       schedule=RefinementSchedule.from_config(cfg, total_steps=20))
    assert (out.format, out.recall, out.precision, out.total) == (1.0, 1.0, 1.0, 3.0)
