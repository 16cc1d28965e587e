"""Run on simulated host n1 by test_multihost_sglang.py: push weights to a real SGLang server on host n2.

1. The tensor transport (shared-memory handles) is refused before anything is sent: the server runs on another
   host. The server is untouched (still healthy, still at weight version 0).
2. The distributed transport pushes new weights over a process group with the server's TP ranks; the trainer's
   side of the group listens on the address of this host that routes to the server (not 127.0.0.1).
3. The server then samples with exactly the new weights: its logprobs equal the in-process reference's.

Writes a JSON report to argv[3].
"""

import json
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from sglang_testkit import max_logprob_gap, perturbed, requests_for  # noqa: E402

from megatron_vr1.rollout.hf_engine import HFEngine  # noqa: E402
from megatron_vr1.rollout.hosts import TransportUnreachable  # noqa: E402
from megatron_vr1.rollout.sglang_engine import SGLangEngine, image_pad_id_of  # noqa: E402
from megatron_vr1.rollout.sglang_http import Endpoint, is_healthy, weight_version  # noqa: E402
from megatron_vr1.weight_sync.buckets import MB, rebucket  # noqa: E402
from megatron_vr1.weight_sync.distributed import DistributedTransport  # noqa: E402
from megatron_vr1.weight_sync.syncer import WeightSyncer  # noqa: E402
from megatron_vr1.weight_sync.tensor import TensorTransport  # noqa: E402


def main(url: str, model_dir: str, out: str, image: str, api_key: str) -> None:
    endpoint = Endpoint(url, api_key)
    report: dict = {}
    try:
        WeightSyncer([endpoint], TensorTransport(device="cpu"), device="cpu")
        report["tensor_refused"] = None
    except TransportUnreachable as e:
        report["tensor_refused"] = str(e)
    report["healthy_after_refusal"] = is_healthy(endpoint)
    report["version_after_refusal"] = weight_version(endpoint)

    engine = SGLangEngine([endpoint], image_pad_id=image_pad_id_of(model_dir), request_timeout_s=300.0)
    transport = DistributedTransport(device="cpu", timeout_s=300.0)
    syncer = WeightSyncer([endpoint], transport, device="cpu", engine=engine)
    new = perturbed(model_dir, 7)
    try:
        version = syncer.sync(lambda: rebucket(new.items(), 1 * MB)).version
        report["group_address"] = transport.group_address
        report["version"], report["server_version"] = version, weight_version(endpoint)
        reference = HFEngine(model_dir)
        reference.update_weights(new.items(), version)
        requests = requests_for(image, tag="dedicated")
        groups = engine.generate(requests)
        report["completion_versions"] = sorted({c.weight_version for g in groups for c in g})
        report["gap"] = max_logprob_gap(groups, requests, reference)
    finally:
        syncer.close()
    Path(out).write_text(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:])
