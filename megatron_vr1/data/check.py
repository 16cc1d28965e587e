"""``megatron-vr1 data check``: validate every row of a dataset and report each bad one.

Beyond the schema checks of ``parse_row`` this decodes every image (missing or corrupt files) and compares
its size with the row's width/height (``image_check.check_image``, the same check the training stream applies).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from megatron_vr1.data.image_check import check_image
from megatron_vr1.data.readers import open_rows, read_row
from megatron_vr1.data.schema import RowError


@dataclass(slots=True)
class CheckReport:
    path: Path
    rows: int = 0
    errors: list[RowError] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        return f"{self.path}: {self.rows} rows, {len(self.errors)} bad"


def check_rows(path: str | Path, *, decode_images: bool = True) -> CheckReport:
    """Check every row of ``path``; the report lists one RowError per bad row (file, row, field)."""
    source = open_rows(path)
    report = CheckReport(path=Path(path), rows=len(source))
    for i in range(len(source)):
        try:
            row = read_row(source, i)
            if decode_images:
                check_image(row, source.path, source.row_number(i))
        except RowError as e:
            report.errors.append(e)
    return report

