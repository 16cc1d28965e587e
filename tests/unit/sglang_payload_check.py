"""Run by tests/unit/test_sglang_payloads.py under .venv-sglang's interpreter (the main venv has no sglang).

Reads payloads.json ({"cases": [{"kind", "payload"}...]}) and expected.safetensors, validates each payload the
way SGLang's HTTP server does (pydantic TypeAdapter of the io_struct dataclass = FastAPI's body parsing), then
the dataclass's own checks, and for tensor updates deserializes the bucket with SGLang's SafeUnpickler and
rebuilds it with its FlattenedTensorBucket. Prints one JSON line per case: {"kind", "ok", "detail"}.
"""

import json
import sys
from pathlib import Path

from pydantic import TypeAdapter
from safetensors.torch import load_file
from sglang.srt.managers import io_struct as io
from sglang.srt.utils.common import MultiprocessingSerializer
from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket, FlattenedTensorMetadata

DATACLASS = {
    "generate": io.GenerateReqInput,
    "pause": io.PauseGenerationReqInput,
    "continue": io.ContinueGenerationReqInput,
    "update_tensor": io.UpdateWeightsFromTensorReqInput,
    "init_group": io.InitWeightsUpdateGroupReqInput,
    "update_distributed": io.UpdateWeightsFromDistributedReqInput,
    "destroy_group": io.DestroyWeightsUpdateGroupReqInput,
    "update_disk": io.UpdateWeightFromDiskReqInput,
    "weight_version": io.UpdateWeightVersionReqInput,
    "release_memory": io.ReleaseMemoryOccupationReqInput,
    "resume_memory": io.ResumeMemoryOccupationReqInput,
}


def check(kind: str, payload: dict, expected: dict) -> str:
    obj = TypeAdapter(DATACLASS[kind]).validate_python(payload)
    if kind == "generate":
        obj.normalize_batch_and_arguments()
        assert obj.batch_size == len(payload["text"]), obj.batch_size
        n = obj.parallel_sample_num
        assert len(obj.sampling_params) == obj.batch_size * n, (len(obj.sampling_params), n)
        if payload.get("image_data") is not None:
            assert len(obj.image_data) == obj.batch_size * n, len(obj.image_data)
        for p in obj.sampling_params:
            io_sampling = __import__("sglang.srt.sampling.sampling_params", fromlist=["SamplingParams"])
            io_sampling.SamplingParams(**p).verify(vocab_size=512)
        return f"batch of {obj.batch_size}" + (f" x {n} samples" if n > 1 else "")
    if kind == "update_tensor":
        message = MultiprocessingSerializer.deserialize(obj.serialized_named_tensors[0])
        if obj.load_format == "flattened_bucket":
            meta = [FlattenedTensorMetadata(name=m.name, shape=m.shape, dtype=m.dtype, start_idx=m.start_idx,
                                            end_idx=m.end_idx, numel=m.numel) for m in message["metadata"]]
            tensors = FlattenedTensorBucket(flattened_tensor=message["flattened_tensor"],
                                            metadata=meta).reconstruct_tensors()
        else:
            tensors = message
        for name, t in tensors:
            want = expected[name]
            assert t.dtype == want.dtype and t.shape == want.shape, (name, t.dtype, t.shape)
            assert bool((t == want).all()), f"{name} differs"
        return f"{len(tensors)} tensors equal"
    return type(obj).__name__


def main() -> None:
    work = Path(sys.argv[1])
    cases = json.loads((work / "payloads.json").read_text())["cases"]
    expected = load_file(str(work / "expected.safetensors"))
    for case in cases:
        try:
            detail, ok = check(case["kind"], case["payload"], expected), True
        except Exception as e:  # reported to the test, which fails with the message
            detail, ok = f"{type(e).__name__}: {e}", False
        print(json.dumps({"kind": case["kind"], "label": case.get("label", ""), "ok": ok, "detail": detail}),
              flush=True)


if __name__ == "__main__":
    main()
