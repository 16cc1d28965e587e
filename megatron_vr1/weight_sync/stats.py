"""What one weight push cost: bytes, tensors, buckets and seconds (for logs and the sync benchmark)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class TransportStats:
    transport: str
    bytes: int = 0
    tensors: int = 0
    buckets: int = 0
    seconds: float = 0.0

    def add_bucket(self, nbytes: int, ntensors: int) -> None:
        self.bytes += nbytes
        self.tensors += ntensors
        self.buckets += 1

    @property
    def gb_per_s(self) -> float:
        return self.bytes / 1e9 / self.seconds if self.seconds > 0 else float("nan")
