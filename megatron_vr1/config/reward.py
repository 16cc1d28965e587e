"""RewardConfig: the Vision-R1 criteria and the progressive-refinement schedule (see rewards/).

Every behaviour where the paper and the released code disagree (spec vision-r1.md §8) is a knob.
A knob left at ``None`` follows the preset; ``rules()`` returns the resolved, fully concrete
``RewardRules``. Keeping ``None`` (instead of copying the preset's values into the fields) means
``--set reward.preset=paper`` switches every knob the user did not set explicitly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from megatron_vr1.config.base import require

Band = tuple[float, float]
"""(ξ1, ξ2) of the differentiation f(x): 0 below ξ1, 1 above ξ2, x in between."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StageThresholds:
    """The thresholds of one refinement stage."""

    tp_threshold: float
    """ξ0: a matched prediction counts as a true positive for recall when its overlap reaches this."""
    recall_band: Band
    """(ξ1, ξ2) applied to the recall of a completion; (0, 1) = no differentiation."""
    precision_band: Band
    """(ξ1, ξ2) applied to each matched instance's overlap; (0, 1) = clip at 0 only (released step=None)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RewardRules:
    """RewardConfig with every knob resolved (what the scorer reads)."""

    preset: str
    output_format: str
    coordinates: str
    coordinate_cast: str
    iou_kind: str
    matching_cost: str
    tp_rule: str
    band_upper: str
    precision_gate: bool
    precision_denominator: str
    label_rule: str
    format_check: str
    negative_samples: str
    total: str
    without_step: str
    schedule_unit: str
    switch_step: int
    switch_fraction: float
    beginner: StageThresholds
    advanced: StageThresholds
    plain: StageThresholds
    max_completion_chars: int
    max_predictions: int


# The two presets. "official" = Vision-R1/vision_r1/visionr1_qwen.py as released; "paper" = arXiv 2503.18013.
PRESETS: dict[str, dict] = {
    "official": dict(
        output_format="qwen_json", coordinates="absolute", coordinate_cast="truncate", iou_kind="giou",
        matching_cost="released", tp_rule="clamp", band_upper="exclusive", precision_gate=False,
        precision_denominator="matched", label_rule="ignore", format_check="loose", negative_samples="invert_format", total="sum",
        without_step="plain", schedule_unit="step", switch_step=1500, switch_fraction=0.5,
        beginner_tp_threshold=0.5, beginner_recall_band=(0.5, 0.75), beginner_precision_band=(0.5, 0.75),
        # The released code does not tighten recall's band after the switch (spec §2.2).
        advanced_tp_threshold=0.75, advanced_recall_band=(0.5, 0.75), advanced_precision_band=(0.75, 0.9),
    ),
    "paper": dict(
        output_format="qwen_json", coordinates="absolute", coordinate_cast="float", iou_kind="iou",
        matching_cost="box_only", tp_rule="indicator", band_upper="inclusive", precision_gate=True,
        precision_denominator="all_predictions", label_rule="ignore", format_check="strict", negative_samples="abstain", total="sum",
        without_step="beginner", schedule_unit="fraction", switch_step=1500, switch_fraction=0.5,
        beginner_tp_threshold=0.5, beginner_recall_band=(0.5, 0.75), beginner_precision_band=(0.5, 0.75),
        advanced_tp_threshold=0.75, advanced_recall_band=(0.75, 0.9), advanced_precision_band=(0.75, 0.9),
    ),
}

_CHOICES: dict[str, tuple] = {
    "output_format": ("qwen_json", "griffon_text"),
    "coordinates": ("absolute", "normalized_1000"),
    "coordinate_cast": ("truncate", "float"),
    "iou_kind": ("giou", "iou"),
    "matching_cost": ("released", "box_only"),
    "tp_rule": ("clamp", "indicator"),
    "band_upper": ("exclusive", "inclusive"),
    "precision_denominator": ("matched", "all_predictions"),
    "label_rule": ("ignore", "match"),
    "format_check": ("loose", "strict"),
    "negative_samples": ("invert_format", "abstain"),
    "total": ("sum", "mean"),
    "without_step": ("plain", "beginner"),
    "schedule_unit": ("step", "fraction"),
}


@dataclass(kw_only=True, slots=True)
class RewardConfig:
    preset: Literal["official", "paper"] = "official"
    """"official": the released Vision-R1 code, quirks included; "paper": the paper's text."""
    output_format: Literal["qwen_json", "griffon_text"] | None = None
    """Qwen2.5-VL JSON list of {"bbox_2d", "label"}, or Griffon-G text `label-[x1,y1,x2,y2] & ...` (0-1, 3 decimals)."""
    coordinates: Literal["absolute", "normalized_1000"] | None = None
    """Qwen JSON boxes: "absolute" pixels of the resized input (Qwen2.5-VL) or 0-1000 normalised (Qwen2-VL)."""
    coordinate_cast: Literal["truncate", "float"] | None = None
    """"truncate": int() as the released parser does; "float": keep sub-pixel coordinates."""
    iou_kind: Literal["giou", "iou"] | None = None
    """Overlap used for thresholds and reward values: GIoU (released) or IoU (paper)."""
    matching_cost: Literal["released", "box_only"] | None = None
    """"released": L1(px) - class one-hot - GIoU; "box_only": L1(px) - GIoU (paper's box-prioritized matcher)."""
    tp_rule: Literal["clamp", "indicator"] | None = None
    """"clamp": released (ξ0, ξ0) clamp, an overlap exactly equal to ξ0 counts ξ0; "indicator": 1[x >= ξ0]."""
    band_upper: Literal["exclusive", "inclusive"] | None = None
    """f(x) = 1 when x > ξ2 (released) or x >= ξ2 (paper)."""
    precision_gate: bool | None = None
    """Paper Eq. 6: zero a matched instance whose overlap is below ξ0 before differentiating it."""
    precision_denominator: Literal["matched", "all_predictions"] | None = None
    """Average over matched pairs (released) or over all predictions (author's EasyR1 port; penalises spam)."""
    label_rule: Literal["ignore", "match"] | None = None
    """Labels in the reward value. "ignore" (both presets): only the matching cost sees them. "match" (an
    extension, not in the paper or code): a matched pair with a wrong label counts as overlap 0, so it is
    neither a true positive nor precise, as COCO AP scores it. Matching stays box-prioritized."""
    format_check: Literal["loose", "strict"] | None = None
    """"loose": released check (only bbox_2d lists of 4); "strict": template and content (bounds) checks."""
    negative_samples: Literal["invert_format", "abstain"] | None = None
    """num_instances == 0: released inverts the format reward; "abstain" rewards an empty answer, format kept."""
    total: Literal["sum", "mean"] | None = None
    """total = format + recall + precision ("sum", [0, 3]) or their mean ([0, 1], EasyR1 port)."""
    without_step: Literal["plain", "beginner"] | None = None
    """step=None: "plain" = no differentiation (released default without --adaptive); "beginner" = stage 1."""
    schedule_unit: Literal["step", "fraction"] | None = None
    """Switch to the advanced stage at ``switch_step`` (released) or at ``switch_fraction`` of training (paper)."""
    switch_step: int | None = None
    """Optimizer step of the switch (released: 1500, hard-coded there)."""
    switch_fraction: float | None = None
    """Fraction of total training steps at the switch (paper's STEP; best 1/2 for Griffon-G, 1 for Qwen)."""
    beginner_tp_threshold: float | None = None
    """ξ0 before the switch (0.5 in both)."""
    beginner_recall_band: tuple[float, float] | None = None
    beginner_precision_band: tuple[float, float] | None = None
    advanced_tp_threshold: float | None = None
    """ξ0 after the switch (0.75 in both)."""
    advanced_recall_band: tuple[float, float] | None = None
    """Released: stays (0.5, 0.75); paper: (0.75, 0.9)."""
    advanced_precision_band: tuple[float, float] | None = None
    plain_tp_threshold: float = 0.5
    """ξ0 when there is no differentiation (released step=None: GIoU 0.5)."""
    max_completion_chars: int = 65536
    """Longer completions are not parsed (format 0, no boxes): bounds the cost of hostile input."""
    max_predictions: int = 1024
    """Boxes beyond this many are ignored for matching (they still count in an all-predictions denominator)."""

    def __post_init__(self) -> None:
        require(self.preset in PRESETS, "reward.preset", self.preset, "use official or paper")
        for name, choices in _CHOICES.items():
            v = getattr(self, name)
            require(v is None or v in choices, f"reward.{name}", v, f"use one of {list(choices)} or leave unset")
        require(self.switch_step is None or self.switch_step >= 0, "reward.switch_step", self.switch_step,
                "use a step >= 0 (released: 1500)")
        require(self.switch_fraction is None or 0.0 <= self.switch_fraction <= 1.0, "reward.switch_fraction",
                self.switch_fraction, "use a fraction in [0, 1] (1 = never switch)")
        for name in ("beginner_tp_threshold", "advanced_tp_threshold", "plain_tp_threshold"):
            v = getattr(self, name)
            require(v is None or -1.0 <= v <= 1.0, f"reward.{name}", v, "use an overlap threshold in [-1, 1]")
        for name in ("beginner_recall_band", "beginner_precision_band", "advanced_recall_band",
                     "advanced_precision_band"):
            v = getattr(self, name)
            ok = v is None or (len(v) == 2 and -1.0 <= v[0] <= v[1] <= 1.0)
            require(ok, f"reward.{name}", v, "use (xi1, xi2) with -1 <= xi1 <= xi2 <= 1, e.g. (0.5, 0.75)")
        require(self.max_completion_chars >= 64, "reward.max_completion_chars", self.max_completion_chars,
                "use >= 64 (512 tokens are ~2,000 characters)")
        require(self.max_predictions >= 1, "reward.max_predictions", self.max_predictions, "use >= 1")
        if self.output_format == "griffon_text":
            require(self.coordinates in (None, "absolute"), "reward.coordinates", self.coordinates,
                    "Griffon-G text is always 0-1 normalised; leave coordinates unset")

    def rules(self) -> RewardRules:
        """The resolved rules: explicit knobs win, the rest come from the preset."""
        base = PRESETS[self.preset]
        v = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        pick = {k: (v[k] if v.get(k) is not None else base[k]) for k in base}

        def stage(prefix: str) -> StageThresholds:
            return StageThresholds(tp_threshold=float(pick[f"{prefix}_tp_threshold"]),
                                   recall_band=tuple(pick[f"{prefix}_recall_band"]),
                                   precision_band=tuple(pick[f"{prefix}_precision_band"]))

        # Released step=None: modify_list(0, 1) on recall (a no-op) and modify_tensor(0, 1) per instance (clip at 0).
        plain = StageThresholds(tp_threshold=float(self.plain_tp_threshold), recall_band=(0.0, 1.0),
                                precision_band=(0.0, 1.0))
        scalars = {k: pick[k] for k in _CHOICES} | {"precision_gate": bool(pick["precision_gate"])}
        return RewardRules(preset=self.preset, **scalars, switch_step=int(pick["switch_step"]),
                           switch_fraction=float(pick["switch_fraction"]), beginner=stage("beginner"),
                           advanced=stage("advanced"), plain=plain, max_completion_chars=self.max_completion_chars,
                           max_predictions=self.max_predictions)
