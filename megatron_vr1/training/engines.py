"""The trainer's rollout engine: the in-process transformers engine, or SGLang servers (launched here or
attached by URL) kept in sync with the policy through one WeightSyncer.

Every weight push goes through the exporter (``Policy.export_buckets``) whatever the transport, and carries a
monotonically increasing ``weight_version`` that the syncer verifies on every server. A server that dies is
restarted and brought to the current weights, whenever it dies: while generating (the SGLang engine restarts it
and calls the syncer's ``resync``) or inside a sync (the syncer restarts it and pushes again). Either re-exports
the policy's weights, which every rank takes part in (``training.weights``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from megatron_vr1.config.run import RunConfig
from megatron_vr1.rollout.engine import RolloutEngine


class SGLangRollout:
    """The RolloutEngine the loop drives: an ``SGLangEngine`` plus the ``WeightSyncer`` that updates it. The
    weight source is a callable that exports again on every call (``training.weights.WeightExports``): the
    syncer calls it once per push, and once more for each server it had to restart."""

    def __init__(self, engine, syncer):
        self.engine, self.syncer = engine, syncer

    @property
    def weight_version(self) -> int:
        return self.engine.weight_version

    def generate(self, requests):
        return self.engine.generate(requests)

    def sync(self, source: Callable[[], Iterable], version: int) -> int:
        """Push ``source()`` as ``version`` to every server; returns the number of tensors sent."""
        return self.syncer.sync(source, version).stats.tensors

    def close(self) -> None:
        try:
            self.syncer.close()
        finally:
            self.engine.close()


def _transport(cfg: RunConfig, device: str):
    from megatron_vr1.weight_sync.disk import DiskTransport
    from megatron_vr1.weight_sync.distributed import DistributedTransport
    from megatron_vr1.weight_sync.tensor import TensorTransport

    kind = cfg.rollout.sync_transport
    if kind == "tensor":
        return TensorTransport(device=device)
    if kind == "distributed":
        return DistributedTransport(device=device, timeout_s=cfg.rollout.request_timeout_s)
    return DiskTransport(root=Path(cfg.log.run_dir) / "weights", base_model_dir=cfg.model.hf_path)


def build_engine(cfg: RunConfig) -> RolloutEngine:
    """Rank 0's rollout engine for ``cfg.rollout.engine``."""
    if cfg.rollout.engine == "hf":
        from megatron_vr1.parallel.state import device
        from megatron_vr1.rollout.hf_engine import HFEngine

        # In process, on rank 0's run device (its GPU beside the trainer, else the CPU).
        return HFEngine(cfg.model.hf_path, dtype=cfg.model.dtype, device=str(device()),
                        min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels)
    from megatron_vr1.rollout.sglang_engine import SGLangEngine, image_pad_id_of
    from megatron_vr1.rollout.sglang_http import Endpoint
    from megatron_vr1.rollout.sglang_server import SGLangServer, ServerSpec
    from megatron_vr1.weight_sync.syncer import WeightSyncer

    r = cfg.rollout
    if r.server_urls:
        targets = [Endpoint(url=url, api_key=r.api_key) for url in r.server_urls]
    else:
        server = SGLangServer(ServerSpec(model_path=cfg.model.hf_path, host=r.host, port=r.port, api_key=r.api_key,
                                         max_running_requests=r.max_running_requests,
                                         max_total_tokens=r.max_total_tokens, mem_fraction_static=r.mem_fraction_static,
                                         log_dir=str(Path(cfg.log.run_dir) / "sglang")))
        server.start()
        targets = [server]
    parallel = r.parallel_sampling == "on" or (r.parallel_sampling == "auto" and not r.server_urls)
    engine = SGLangEngine(targets, image_pad_id=image_pad_id_of(cfg.model.hf_path),
                          request_timeout_s=r.request_timeout_s, parallel_sampling=parallel)
    try:
        device = "cuda" if any(getattr(t, "spec", None) and t.spec.resolved_device() == "cuda" for t in targets) \
            else "cpu"
        syncer = WeightSyncer(engine.endpoints, _transport(cfg, device), device=device, engine=engine)
    except BaseException:
        engine.close()
        raise
    return SGLangRollout(engine, syncer)
