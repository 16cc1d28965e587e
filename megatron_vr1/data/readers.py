"""Row sources for Vision-R1 data: JSONL, parquet and HF ``datasets`` saved to disk.

A source gives random access to raw rows (``raw(i)``), so the sampler can shard and shuffle without
materialising parsed rows; parsing/validation happens when a row is drawn. ``open_rows`` picks the reader
from the path. ``iter_parsed`` applies ``on_bad_row`` ("error": raise the RowError; "skip": count it).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from megatron_vr1.data.schema import RowError, VisionR1Row, parse_row

OnBadRow = Literal["error", "skip"]
MAX_JSONL_LINE_BYTES = 64 * 1024 * 1024


class RowSource(Protocol):
    path: Path
    base_dir: Path

    def __len__(self) -> int: ...

    def raw(self, index: int) -> Any:
        """The raw row ``index`` (a dict), or raise RowError if it cannot even be read."""


class JsonlSource:
    """One JSON object per line; ``image`` may be a path relative to the file or base64. Row numbers are
    1-based line numbers (blank lines are skipped but keep their numbers)."""

    def __init__(self, path: Path):
        self.path, self.base_dir = path, path.parent
        self._lines: list[tuple[int, bytes]] = []
        with path.open("rb") as f:
            for lineno, line in enumerate(f, start=1):
                if len(line) > MAX_JSONL_LINE_BYTES:
                    raise RowError(path, lineno, "<line>", f"line of {len(line)} bytes exceeds the "
                                                           f"{MAX_JSONL_LINE_BYTES} byte cap; store images as files")
                if line.strip():
                    self._lines.append((lineno, line))

    def __len__(self) -> int:
        return len(self._lines)

    def row_number(self, index: int) -> int:
        return self._lines[index][0]

    def raw(self, index: int) -> Any:
        lineno, line = self._lines[index]
        try:
            return json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RowError(self.path, lineno, "<line>", f"not valid JSON ({e}); write one JSON object per line") \
                from None


class ParquetSource:
    """A parquet file with the Vision-R1 columns (``image`` as a path, bytes, or an HF {bytes, path} struct)."""

    def __init__(self, path: Path):
        import pyarrow.parquet as pq

        self.path, self.base_dir = path, path.parent
        self._table = pq.read_table(path)

    def __len__(self) -> int:
        return self._table.num_rows

    def row_number(self, index: int) -> int:
        return index

    def raw(self, index: int) -> Any:
        return self._table.slice(index, 1).to_pylist()[0]


class HFDiskSource:
    """An HF dataset written with ``Dataset.save_to_disk`` (or a DatasetDict: its "train" split)."""

    def __init__(self, path: Path, split: str = "train"):
        import datasets

        self.path, self.base_dir = path, path
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise RowError(path, 0, "<split>", f"split {split!r} not in {list(ds)}; pick one of them")
            ds = ds[split]
        if "image" in ds.column_names and isinstance(ds.features["image"], datasets.Image):
            ds = ds.cast_column("image", datasets.Image(decode=False))  # keep encoded bytes; decode on demand
        self._ds = ds

    def __len__(self) -> int:
        return len(self._ds)

    def row_number(self, index: int) -> int:
        return index

    def raw(self, index: int) -> Any:
        return self._ds[index]


def open_rows(path: str | Path) -> JsonlSource | ParquetSource | HFDiskSource:
    """Open a rows file by its kind: ``*.jsonl``/``*.json`` lines, ``*.parquet``, or a save_to_disk folder."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such rows file or dataset folder; check the data path")
    if p.is_dir():
        if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists():
            return HFDiskSource(p)
        raise ValueError(f"{p}: a folder but not an HF dataset saved with save_to_disk (no dataset_info.json)")
    if p.suffix == ".parquet":
        return ParquetSource(p)
    if p.suffix in (".jsonl", ".json"):
        return JsonlSource(p)
    raise ValueError(f"{p}: unknown rows format {p.suffix!r}; use .jsonl, .parquet or an HF save_to_disk folder")


def read_row(source: Any, index: int) -> VisionR1Row:
    """Parse and validate row ``index`` of ``source`` (raises RowError)."""
    return parse_row(source.raw(index), file=source.path, row=source.row_number(index), base_dir=source.base_dir)


@dataclass(slots=True)
class BadRowCounter:
    """Skipped rows by field, with the first few messages kept for the end-of-epoch report."""

    skipped: int = 0
    by_field: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    max_examples: int = 5

    def add(self, error: RowError) -> None:
        self.skipped += 1
        self.by_field[error.field] = self.by_field.get(error.field, 0) + 1
        if len(self.examples) < self.max_examples:
            self.examples.append(str(error))

    def report(self, examples: bool = True) -> str:
        """Counts by field, then the first messages; ``examples=False`` where each row was already named."""
        if not self.skipped:
            return "0 bad rows skipped"
        fields = ", ".join(f"{k}: {v}" for k, v in sorted(self.by_field.items()))
        head = f"{self.skipped} bad rows skipped ({fields})"
        return head + "; first: " + " | ".join(self.examples) if examples else head


def iter_parsed(source: Any, indices: Any = None, *, on_bad_row: OnBadRow = "error",
                counter: BadRowCounter | None = None) -> Iterator[tuple[int, VisionR1Row]]:
    """Yield (index, row) for ``indices`` (default: all), raising or counting bad rows per ``on_bad_row``."""
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row={on_bad_row!r} is invalid: use 'error' or 'skip'")
    for i in range(len(source)) if indices is None else indices:
        try:
            yield i, read_row(source, i)
        except RowError as e:
            if on_bad_row == "error":
                raise
            if counter is not None:
                counter.add(e)
