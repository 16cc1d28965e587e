"""The training stream: rows file -> sharded, shuffled, filtered, validated ``Sample`` records.

A row is bad when its fields fail ``parse_row`` or its image is missing, unreadable or not the row's
width x height (``image_check.check_image``, the check ``megatron-vr1 data check`` runs). Bad rows follow
``on_bad_row``: "error" raises the RowError naming file, row and field; "skip" logs that message the first time the
row is met (a row met again in a later epoch is counted, not named again) and counts it.
Rows outside the num_instances limits are filtered (counted separately: they are valid, just not used).
At the end of each epoch the counts are logged and kept in ``epoch_reports``; ``bad_rows_skipped`` is the running
total the trainer logs as ``data/bad_rows_skipped``. Nothing is dropped silently.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from megatron_vr1.data.image import Backend, open_image, preprocess
from megatron_vr1.data.image_check import check_image
from megatron_vr1.data.prompts import DEFAULT_SYSTEM, render_prompt
from megatron_vr1.data.readers import BadRowCounter, OnBadRow, open_rows, read_row
from megatron_vr1.data.sampler import ShardedSampler
from megatron_vr1.data.schema import RowError
from megatron_vr1.types import Sample

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EpochReport:
    epoch: int
    rank: int
    yielded: int
    filtered: int
    skipped: int
    detail: str


class LocalizationDataset:
    """Iterate Samples of one rank forever; ``state_dict`` saves the position for checkpoints."""

    def __init__(self, path: str | Path, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, on_bad_row: OnBadRow = "error", min_instances: int = 0,
                 max_instances: int = 10_000, min_pixels: int = 4 * 28 * 28, max_pixels: int = 512 * 28 * 28):
        if on_bad_row not in ("error", "skip"):
            raise ValueError(f"on_bad_row={on_bad_row!r} is invalid: use 'error' or 'skip'")
        self.source = open_rows(path)
        self.sampler = ShardedSampler(len(self.source), rank=rank, world_size=world_size, seed=seed,
                                      shuffle=shuffle)
        self.on_bad_row = on_bad_row
        self.min_instances, self.max_instances = min_instances, max_instances
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.epoch_reports: list[EpochReport] = []
        self._bad = BadRowCounter()
        self._filtered = 0
        self._yielded = 0
        self._skipped_before = 0  # bad rows of closed training epochs (and of the run before a resume)
        self._paused: tuple | None = None  # the training epoch's counters while iter_epoch runs
        self._named: set[int] = set()  # rows whose RowError was logged already

    @classmethod
    def from_config(cls, cfg, path: str | Path, *, rank: int = 0, world_size: int = 1) -> LocalizationDataset:
        """Build from a ``DataConfig`` (seed, on_bad_row, instance limits, pixel budget)."""
        return cls(path, rank=rank, world_size=world_size, seed=cfg.seed, on_bad_row=cfg.on_bad_row,
                   min_instances=cfg.min_instances, max_instances=cfg.max_instances,
                   min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)

    def __len__(self) -> int:
        return len(self.source)

    def __iter__(self) -> Iterator[Sample]:
        current = self.sampler.epoch
        for epoch, index in self.sampler:
            if epoch != current:
                self._skipped_before += self._bad.skipped
                self._close_epoch(current)
                current = epoch
            sample = self._load(index)
            if sample is not None:
                self._yielded += 1
                yield sample

    def iter_epoch(self, epoch: int = 0) -> Iterator[Sample]:
        """One pass over this rank's shard of ``epoch`` (for evaluation); the training position is untouched.
        Bad/filtered rows are counted and reported at the end like a training epoch."""
        saved = self._paused = (self._bad, self._filtered, self._yielded)
        self._bad, self._filtered, self._yielded = BadRowCounter(), 0, 0
        try:
            for index in self.sampler.epoch_indices(epoch):
                sample = self._load(int(index))
                if sample is not None:
                    self._yielded += 1
                    yield sample
            self._close_epoch(epoch)
        finally:
            self._bad, self._filtered, self._yielded = saved
            self._paused = None

    @property
    def bad_rows_skipped(self) -> int:
        """Bad rows skipped by the training stream so far: closed epochs plus the current one, carried across a
        resume by ``state_dict`` (``iter_epoch`` passes are not counted). Counted where the rows are read: only
        rank 0 reads data and scatters shards to the other ranks, so this number holds for every rank."""
        current = self._paused[0] if self._paused is not None else self._bad
        return self._skipped_before + current.skipped

    def _load(self, index: int) -> Sample | None:
        """Row ``index`` as a Sample, or None when it is filtered or bad (``on_bad_row="skip"``). Filtered rows are
        not decoded. The image decoded for the check is handed to the ``model_inputs`` call for this Sample."""
        rownum = self.source.row_number(index)
        try:
            row = read_row(self.source, index)
            if not self.min_instances <= row.num_instances <= self.max_instances:
                self._filtered += 1
                return None
            image = check_image(row, self.source.path, rownum)
            sample = _to_sample(row, f"{self.source.path.name}:{rownum}", self.source.path, rownum,
                                min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        except RowError as e:
            if self.on_bad_row == "error":
                raise
            self._skip(index, e)
            return None
        _decoded.keep(sample, image)
        return sample

    def _skip(self, index: int, error: RowError) -> None:
        """Count a bad row; name it in the log the first time only (epochs revisit the same rows)."""
        self._bad.add(error)
        if index not in self._named:
            self._named.add(index)
            log.warning("data: skipping %s (data.on_bad_row=skip)", error)

    def _close_epoch(self, epoch: int) -> None:
        if self._yielded == 0:  # every row bad or filtered: iterating further would spin forever
            raise ValueError(f"{self.source.path}: epoch {epoch} produced no usable sample on rank "
                             f"{self.sampler.rank} ({self._filtered} filtered, {self._bad.report()}); "
                             f"fix the data or the num_instances limits")
        report = EpochReport(epoch=epoch, rank=self.sampler.rank, yielded=self._yielded, filtered=self._filtered,
                             skipped=self._bad.skipped, detail=self._bad.report())
        self.epoch_reports.append(report)
        log.warning("data %s epoch %d rank %d: %d samples, %d filtered by num_instances, %s",
                    self.source.path, epoch, report.rank, report.yielded, report.filtered,
                    self._bad.report(examples=False))  # each bad row was named when first met
        self._bad, self._filtered, self._yielded = BadRowCounter(), 0, 0

    def state_dict(self) -> dict:
        """The sampler position and the bad-row total (so ``data/bad_rows_skipped`` continues across a resume)."""
        return {"sampler": self.sampler.state_dict(), "bad_rows_skipped": self.bad_rows_skipped}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self._skipped_before, self._bad = int(state.get("bad_rows_skipped", 0)), BadRowCounter()


def _to_sample(row, sample_id: str, file: Path, rownum: int, *, min_pixels: int, max_pixels: int) -> Sample:
    """``row.to_sample`` with smart_resize's refusal (aspect ratio above 200) reported as a bad row."""
    try:
        return row.to_sample(sample_id, min_pixels=min_pixels, max_pixels=max_pixels)
    except ValueError as e:
        raise RowError(file, rownum, "width", f"{e}") from None


class _DecodedHandoff:
    """The image the dataset just decoded to check a row, kept for the ``model_inputs`` call of that same Sample
    (the trainer prepares each sample right after drawing it), so the image is decoded once, not twice.

    One slot, matched by the Sample's identity and emptied when taken: Samples stay plain records, memory holds
    at most one decoded image, and any other caller (or a Sample prepared later) simply decodes again.
    """

    __slots__ = ("_entry",)

    def __init__(self) -> None:
        self._entry: tuple[Sample, Image.Image] | None = None

    def keep(self, sample: Sample, image: Image.Image) -> None:
        self._entry = (sample, image)

    def take(self, sample: Sample) -> Image.Image | None:
        entry, self._entry = self._entry, None
        return entry[1] if entry is not None and entry[0] is sample else None


_decoded = _DecodedHandoff()


@dataclass(frozen=True, slots=True)
class ModelInputs:
    """What the policy/rollout needs for one Sample: the chat prompt and the image's pixel patches."""

    prompt: str
    """Chat text with <|image_pad|> expanded (tokenise with add_special_tokens=False)."""
    pixel_values: Any
    """float32 numpy array [patches, 3*2*14*14], identical to the processor's."""
    image_grid_thw: tuple[int, int, int]


def model_inputs(sample: Sample, *, min_pixels: int, max_pixels: int, backend: Backend = "torchvision",
                 system: str | None = DEFAULT_SYSTEM) -> ModelInputs:
    """Decode the sample's image (or reuse the dataset's decode of it), resize/patchify it like the processor
    and render the prompt."""
    image = _decoded.take(sample)
    if image is None:
        image = open_image(sample.image)
    pixel_values, grid = preprocess(image, min_pixels=min_pixels, max_pixels=max_pixels, backend=backend)
    if (grid[1] * 14, grid[2] * 14) != (sample.input_height, sample.input_width):
        raise ValueError(f"sample {sample.sample_id}: image decodes to input {grid[2] * 14}x{grid[1] * 14} but the "
                         f"row says {sample.input_width}x{sample.input_height}; fix the row's width/height "
                         f"(megatron-vr1 data check) or use the same min/max_pixels")
    return ModelInputs(prompt=render_prompt(sample.problem, grid, system=system), pixel_values=pixel_values,
                       image_grid_thw=grid)
