"""RolloutConfig: the SGLang rollout servers, sampling, and weight sync."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_vr1.config.base import require


@dataclass(kw_only=True, slots=True)
class RolloutConfig:
    engine: Literal["sglang", "hf"] = "sglang"
    """"sglang": the SGLang HTTP server; "hf": the in-process transformers engine (reference / fallback)."""
    server_urls: tuple[str, ...] = ()
    """Attach to running servers instead of launching one (e.g. http://node3:30000)."""
    host: str = "127.0.0.1"
    """Bind address of a launched server. Only loopback unless you set it."""
    port: int = 0
    """0 picks a free port."""
    api_key: str = ""
    max_running_requests: int = 0
    """A launched server's concurrent requests; 0 = SGLang's default on GPU, 128 on CPU (whole rollout batches)."""
    max_total_tokens: int = 0
    """A launched server's KV cache in tokens; 0 = SGLang sizes it from mem_fraction_static on GPU, 8192 on CPU."""
    mem_fraction_static: float = 0.0
    """Share of a launched server's device memory for its weights and KV cache; 0 = SGLang's default on GPU, 0.05
    on CPU. Lower it when the server shares its GPU with training."""
    parallel_sampling: Literal["auto", "on", "off"] = "auto"
    """Send each prompt's G samples as one SGLang request with ``n`` = G (its image is processed and prefilled
    once) instead of G requests. "auto": on for servers launched here (they are started with the transport it
    needs, ServerSpec.shm_mm_features), off for attached ``server_urls``; "on" for attached servers started by
    ``megatron-vr1 serve-rollout`` or with ``--dist-init-addr``."""
    reward_overlap_chunks: int = 2
    """Generate a step's prompts in this many chunks, scoring each chunk while the next generates; 1 = one
    generate call (best where each server iteration has a fixed cost, as on CPU)."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    request_timeout_s: float = 300.0
    sync_transport: Literal["tensor", "distributed", "disk"] = "tensor"
    """How new weights reach the servers. "tensor": shared-memory (CPU) or CUDA-IPC handles, for servers on this
    host only (a server elsewhere is refused before anything is sent); "distributed": a process group the
    servers' TP ranks join, across hosts (this process listens on its address that routes to the servers);
    "disk": safetensors in the run dir, which the servers must see (a shared filesystem)."""
    bucket_mb: int = 512
    """Weight-sync bucket size; buckets below ~512 MB have corrupted large models in SGLang."""

    def __post_init__(self) -> None:
        require(self.temperature >= 0.0, "rollout.temperature", self.temperature, "use a value >= 0 (0 = greedy)")
        require(0.0 < self.top_p <= 1.0, "rollout.top_p", self.top_p, "use a value in (0, 1]")
        require(self.max_new_tokens >= 1, "rollout.max_new_tokens", self.max_new_tokens, "use an integer >= 1")
        require(0 <= self.port < 65536, "rollout.port", self.port, "use 0 (free port) or a port number")
        require(self.max_running_requests >= 0, "rollout.max_running_requests", self.max_running_requests,
                "use 0 (default) or a positive count")
        require(self.max_total_tokens == 0 or self.max_total_tokens >= 256, "rollout.max_total_tokens",
                self.max_total_tokens, "use 0 (the device's default) or >= 256")
        require(0.0 <= self.mem_fraction_static < 1.0, "rollout.mem_fraction_static", self.mem_fraction_static,
                "use a fraction in [0, 1); 0 picks the default")
        require(self.reward_overlap_chunks >= 1, "rollout.reward_overlap_chunks", self.reward_overlap_chunks,
                "use >= 1")
        require(self.bucket_mb >= 1, "rollout.bucket_mb", self.bucket_mb, "use a positive size in MB")
        require(self.request_timeout_s > 0, "rollout.request_timeout_s", self.request_timeout_s, "use seconds > 0")
