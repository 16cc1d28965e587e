"""DataConfig: where the rows come from and how they are filtered and rendered."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_vr1.config.base import require


@dataclass(kw_only=True, slots=True)
class DataConfig:
    train_path: str = ""
    """Vision-R1 rows: a .jsonl file, a .parquet file, or an HF dataset saved with save_to_disk."""
    val_path: str = ""
    val_gt_path: str = ""
    """COCO-format ground truth of the validation rows (for mAP)."""
    prompt_template: Literal["qwen25vl", "griffon"] = "qwen25vl"
    min_pixels: int = 4 * 28 * 28
    max_pixels: int = 512 * 28 * 28
    """Image budget of smart_resize (released training: 401408 = 512*28*28)."""
    min_instances: int = 1
    max_instances: int = 30
    on_bad_row: Literal["error", "skip"] = "error"
    """A malformed row stops the run ("error") or is skipped and counted ("skip")."""
    seed: int = 1234

    def __post_init__(self) -> None:
        require(28 * 28 <= self.min_pixels <= self.max_pixels, "data.min_pixels", self.min_pixels,
                "use 784 <= min_pixels <= max_pixels")
        require(0 <= self.min_instances <= self.max_instances, "data.min_instances", self.min_instances,
                "use 0 <= min_instances <= max_instances")
