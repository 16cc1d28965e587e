"""The worked case of issue #3 (official preset), presets, config knobs and the refinement schedule."""

import json

import pytest

from megatron_vr1.config.base import ConfigError, apply_override
from megatron_vr1.config.reward import RewardConfig
from megatron_vr1.rewards import RefinementSchedule, score_batch, target_from_row, target_from_sample
from megatron_vr1.types import GroundTruth, Sample

ROW = dict(solution=json.dumps([["person", [[10, 10, 110, 210]]], ["car", [[200, 50, 400, 150]]]]), width=640,
           height=480, input_width=644, input_height=476, target_id_maps='{"person": 1, "car": 2}', num_instances=2)
WORKED = ("```json\n" + '[{"bbox_2d": [12, 12, 109, 203], "label": "person"}, {"bbox_2d": [206, 55, 382, 149], '
          '"label": "car"}, {"bbox_2d": [503, 298, 604, 397], "label": "car"}]' + "\n```")


@pytest.mark.parametrize("step,precision", [(None, 0.87648), (0, 1.0), (2000, 0.91232)])
def test_worked_case_official(step, precision):
    (out,) = score_batch([WORKED], [target_from_row(ROW)], RewardConfig(preset="official"), step)
    assert out.precision == pytest.approx(precision, abs=5e-6)
    assert out.recall == 1.0 and out.format == 1.0
    assert out.total == pytest.approx(2.0 + precision, abs=5e-6)
    assert (out.n_pred, out.n_gt, out.n_matched, out.n_tp, out.parse_status) == (3, 2, 2, 2, "ok")
    assert out.stage == {None: "plain", 0: "beginner", 2000: "advanced"}[step]


@pytest.mark.parametrize("step", [None, 0, 2000])
def test_garbage_scores_zero(step):
    (out,) = score_batch(["garbage"], [target_from_row(ROW)], RewardConfig(), step)
    assert (out.format, out.recall, out.precision, out.total) == (0.0, 0.0, 0.0, 0.0)
    assert out.parse_status == "unparsable"


def test_target_from_sample_matches_row():
    sample = Sample(sample_id="s", problem="p", image=b"", width=640, height=480, input_width=644, input_height=476,
                    num_instances=2, target_id_maps={"person": 1, "car": 2},
                    solution=(GroundTruth(label="person", box=(10, 10, 110, 210)),
                              GroundTruth(label="car", box=(200, 50, 400, 150))))
    a = score_batch([WORKED], [target_from_sample(sample)], RewardConfig(), None)
    b = score_batch([WORKED], [target_from_row(ROW)], RewardConfig(), None)
    assert a == b


def test_per_completion_steps_and_empty_batch():
    t = target_from_row(ROW)
    outs = score_batch([WORKED] * 3, [t] * 3, RewardConfig(), [None, 0, 2000])
    assert [round(o.precision, 5) for o in outs] == [0.87648, 1.0, 0.91232]
    assert score_batch([], [], RewardConfig()) == []
    with pytest.raises(ValueError, match="2 steps for 3"):
        score_batch([WORKED] * 3, [t] * 3, RewardConfig(), [0, 1])


def test_presets_resolve_and_follow_preset_switch():
    off, pap = RewardConfig(preset="official").rules(), RewardConfig(preset="paper").rules()
    assert (off.iou_kind, off.matching_cost, off.precision_denominator, off.format_check) == (
        "giou", "released", "matched", "loose")
    assert (pap.iou_kind, pap.matching_cost, pap.precision_denominator, pap.format_check) == (
        "iou", "box_only", "all_predictions", "strict")
    assert off.advanced.recall_band == (0.5, 0.75) and pap.advanced.recall_band == (0.75, 0.9)
    assert off.switch_step == 1500 and pap.schedule_unit == "fraction" and pap.switch_fraction == 0.5
    # --set reward.preset=paper must switch the knobs the user did not set.
    cfg = apply_override(RewardConfig(iou_kind="iou"), "preset=paper")
    assert cfg.rules().format_check == "strict"
    cfg = apply_override(RewardConfig(preset="paper"), "iou_kind=giou")
    assert cfg.rules().iou_kind == "giou" and cfg.rules().format_check == "strict"


@pytest.mark.parametrize("kwargs,field", [
    (dict(preset="nope"), "reward.preset"), (dict(iou_kind="diou"), "reward.iou_kind"),
    (dict(switch_fraction=1.5), "reward.switch_fraction"), (dict(beginner_recall_band=(0.9, 0.5)),
                                                             "reward.beginner_recall_band"),
    (dict(switch_step=-1), "reward.switch_step"), (dict(max_predictions=0), "reward.max_predictions"),
])
def test_config_errors_name_field_and_fix(kwargs, field):
    with pytest.raises(ConfigError, match=field) as e:
        RewardConfig(**kwargs)
    assert "invalid:" in str(e.value)


def test_schedule_by_step_and_fraction_and_state_dict():
    s = RefinementSchedule.from_config(RewardConfig(preset="official"))
    assert s.stage_at(None).name == "plain" and s.stage_at(1499).name == "beginner"
    assert s.stage_at(1500).name == "advanced"
    p = RefinementSchedule.from_config(RewardConfig(preset="paper"), total_steps=3000)
    assert p.stage_at(None).name == "beginner" and p.stage_at(1499).name == "beginner"
    assert p.stage_at(1500).thresholds.recall_band == (0.75, 0.9)
    never = RefinementSchedule.from_config(RewardConfig(preset="paper", switch_fraction=1.0), total_steps=3000)
    assert never.stage_at(2999).name == "beginner"
    with pytest.raises(ValueError, match="total_steps"):
        RefinementSchedule.from_config(RewardConfig(preset="paper")).stage_at(3)
    for step in (10, 1500, 1600):
        p.observe(step)
    state = json.loads(json.dumps(p.state_dict()))
    assert state["switched_at"] == 1500 and state["last_step"] == 1600
    # A resumed run whose train_steps changed keeps the checkpoint's switch point.
    resumed = RefinementSchedule.from_config(RewardConfig(preset="paper"), total_steps=10000)
    assert resumed.stage_at(2000).name == "beginner"
    resumed.load_state_dict(state)
    assert resumed.stage_at(2000).name == "advanced" and resumed.switched_at == 1500
    with pytest.raises(ValueError, match="missing"):
        resumed.load_state_dict({"unit": "step"})


def test_fraction_schedule_passed_to_score_batch():
    cfg = RewardConfig(preset="paper")
    sched = RefinementSchedule.from_config(cfg, total_steps=100)
    t = target_from_row(ROW)
    early, late = score_batch([WORKED] * 2, [t] * 2, cfg, [10, 60], schedule=sched)
    assert (early.stage, late.stage) == ("beginner", "advanced")


@pytest.mark.parametrize("preset", ["official", "paper"])
def test_label_rule_match_makes_a_wrong_label_a_miss(preset):
    """label_rule=match (an extension for tasks where labels are what SFT gets wrong): the person box
    labelled "car" is still matched by its box, but counts as overlap 0; right labels score as before."""
    t = target_from_row(ROW)
    ignore, match = RewardConfig(preset=preset), RewardConfig(preset=preset, label_rule="match")
    assert ignore.rules().label_rule == "ignore" and match.rules().label_rule == "match"
    assert score_batch([WORKED], [t], match) == score_batch([WORKED], [t], ignore)
    relabelled = WORKED.replace('"person"', '"car"')
    car_only = "```json\n" + '[{"bbox_2d": [206, 55, 382, 149], "label": "car"}]' + "\n```"
    (wrong,) = score_batch([relabelled], [t], match)
    (right,) = score_batch([relabelled], [t], ignore)
    (car,) = score_batch([car_only], [t], match)
    assert right.recall == 1.0 and wrong.recall == 0.5 and wrong.n_tp == 1 and wrong.n_matched == 2
    denominator = 3 if preset == "paper" else 2  # paper: all predictions; official: matched pairs
    assert wrong.precision == pytest.approx(car.precision / denominator, abs=1e-12)  # car_only: 1 pair
    assert wrong.mean_iou == right.mean_iou  # the logged geometry does not depend on labels


def test_label_rule_override_is_validated():
    assert apply_override(RewardConfig(), "label_rule=match").label_rule == "match"
    with pytest.raises(ConfigError, match="reward.label_rule"):
        RewardConfig(label_rule="sometimes")
