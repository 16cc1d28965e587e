"""Human-readable outputs of an evaluation: the per-category AP table and a Table-1-shaped markdown row.

Pure text formatting (no plotting, no torch); figures live in ``eval.figures``.
"""

from __future__ import annotations

from typing import Any

ODINW13_COLUMNS: tuple[str, ...] = ("Pistols", "Pothole", "Thermal")
"""The three ODinW datasets the paper's Table 1 shows next to the ODinW-13 average."""

ODINW13_ALIASES: dict[str, str] = {"pistols": "Pistols", "pothole": "Pothole", "thermaldogsandpeople": "Thermal",
                                   "thermal": "Thermal"}
"""Dataset names (lower-cased, as the released eval spells them) -> Table 1 column."""


def _pct(v: float | None) -> str:
    """COCO value (0-1, or -1 undefined) -> percentage with one decimal as the paper prints it, '-' if undefined."""
    if v is None or v < 0:
        return "-"
    return f"{100.0 * v:.1f}"


def per_category_table(per_category: list[dict[str, Any]]) -> str:
    """A markdown table of per-category AP / AP50 / AP75 (percent) with GT and detection counts."""
    lines = ["| category | id | AP | AP50 | AP75 | #gt | #det |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in per_category:
        lines.append(f"| {row['name']} | {row['id']} | {_pct(row['AP'])} | {_pct(row['AP50'])} | "
                     f"{_pct(row['AP75'])} | {row['n_gt']} | {row['n_det']} |")
    return "\n".join(lines)


def table1_markdown(model: str, resolution: str, coco: dict[str, float] | None,
                    odinw: dict[str, float] | None) -> str:
    """One row shaped like the paper's Table 1: model | Res. | AP50 | AP75 | mAP | Pistols | Pothole | Thermal |
    ODinW-13 Avg. mAP. ``coco`` is a stats dict (AP, AP50, AP75); ``odinw`` maps dataset name -> mAP (0-1).
    Missing entries print '-', as in the paper. The average is over the datasets given (13 for ODinW-13)."""
    header = ("| model | Res. | AP50 | AP75 | mAP | Pistols | Pothole | Thermal | ODinW-13 Avg. mAP |\n"
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    coco = coco or {}
    cols = {c: None for c in ODINW13_COLUMNS}
    avg = None
    if odinw:
        for name, ap in odinw.items():
            col = ODINW13_ALIASES.get(name.lower())
            if col is not None:
                cols[col] = ap
        avg = odinw_average(odinw)
    cells = [model, resolution, _pct(coco.get("AP50")), _pct(coco.get("AP75")), _pct(coco.get("AP")),
             *(_pct(cols[c]) for c in ODINW13_COLUMNS), _pct(avg)]
    if odinw and len(odinw) != 13:
        cells[-1] += f" ({len(odinw)} sets)"
    return header + "\n| " + " | ".join(cells) + " |"


def odinw_average(per_dataset_map: dict[str, float]) -> float:
    """ODinW "Avg. mAP": the plain mean of the per-dataset mAPs (undefined ones, -1, count as 0)."""
    if not per_dataset_map:
        return -1.0
    return sum(max(v, 0.0) for v in per_dataset_map.values()) / len(per_dataset_map)
