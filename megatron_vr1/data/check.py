"""``megatron-vr1 data check``: validate every row of a dataset and report each bad one.

Beyond the schema checks of ``parse_row`` this decodes every image (missing or corrupt files) and compares
its size with the row's width/height.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from megatron_vr1.data.image import open_image
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
                _check_image(row, source.path, source.row_number(i))
        except RowError as e:
            report.errors.append(e)
    return report


def _check_image(row, file: Path, rownum: int) -> None:
    try:
        im = open_image(row.image)
    except FileNotFoundError:
        raise RowError(file, rownum, "image", f"file {row.image} does not exist; fix the path (relative to "
                                              f"the rows file) or add the image") from None
    except (OSError, ValueError) as e:
        raise RowError(file, rownum, "image", f"cannot decode the image ({e}); replace the corrupt file") from None
    if (im.width, im.height) != (row.width, row.height):
        raise RowError(file, rownum, "width", f"row says {row.width}x{row.height} but the image is "
                                              f"{im.width}x{im.height}; set width/height to the image's size")
