"""Transport (c): write a HF checkpoint, then /update_weights_from_disk.

The slowest path, but it works across hosts with a shared filesystem and leaves an inspectable checkpoint per
version. Each version is a complete HF directory: the bucket tensors as safetensors shards (hub names, as the
exporter yields them) plus the non-weight files (config, tokenizer, processor) of the base checkpoint. Only the
newest ``keep`` versions stay on disk.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

from megatron_vr1.rollout.sglang_http import Endpoint, call
from megatron_vr1.rollout.sglang_payloads import update_from_disk_payload
from megatron_vr1.weight_sync.buckets import Bucket, bucket_nbytes
from megatron_vr1.weight_sync.stats import TransportStats

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def write_checkpoint(buckets: Iterable[Bucket], out_dir: Path, base_model_dir: Path) -> TransportStats:
    """A loadable HF directory: one safetensors shard per bucket, an index, and the base's non-weight files."""
    from safetensors.torch import save_file

    stats = TransportStats("disk")
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for path in base_model_dir.iterdir():
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES) and path.name != "model.safetensors.index.json":
            shutil.copy2(path, tmp / path.name)
    weight_map: dict[str, str] = {}
    shards = []
    for i, bucket in enumerate(buckets):
        shard = f"model-{i + 1:05d}.safetensors"
        save_file({name: t.detach().cpu().contiguous() for name, t in bucket}, str(tmp / shard),
                  metadata={"format": "pt"})
        weight_map.update({name: shard for name, _ in bucket})
        shards.append(shard)
        stats.add_bucket(bucket_nbytes(bucket), len(bucket))
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": stats.bytes}, "weight_map": weight_map}, indent=1))
    # Rename last so a reader never sees a half-written version.
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return stats


class DiskTransport:
    """Write the version's checkpoint under ``root`` and have every server reload it."""

    name = "disk"

    def __init__(self, *, root: str | Path, base_model_dir: str | Path, keep: int = 2, timeout_s: float = 600.0):
        self.root = Path(root)
        self.base_model_dir = Path(base_model_dir)
        if not (self.base_model_dir / "config.json").is_file():
            raise FileNotFoundError(f"base_model_dir={base_model_dir}: no config.json; point to the HF checkpoint "
                                    "the servers were launched from")
        if keep < 1:
            raise ValueError(f"keep={keep} is invalid: keep at least 1 version on disk")
        self.keep = keep
        self.timeout_s = timeout_s

    def version_dir(self, version: int) -> Path:
        return self.root / f"v{version:08d}"

    def push(self, endpoints: list[Endpoint], buckets: Iterable[Bucket], version: int) -> TransportStats:
        t0 = time.perf_counter()
        out = self.version_dir(version)
        stats = write_checkpoint(buckets, out, self.base_model_dir)
        payload = update_from_disk_payload(str(out.resolve()), version=version, flush_cache=False)
        for ep in endpoints:
            call(ep, "/update_weights_from_disk", payload, timeout=self.timeout_s)
        self._prune()
        stats.seconds = time.perf_counter() - t0
        return stats

    def _prune(self) -> None:
        versions = sorted(p for p in self.root.glob("v*") if p.is_dir() and not p.name.endswith(".partial"))
        for old in versions[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def close(self) -> None:
        pass
