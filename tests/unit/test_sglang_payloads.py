"""Every payload we send to SGLang, validated by SGLang's own request dataclasses (io_struct, 0.5.10.post1).

The main venv has no sglang (the trainer never imports it), so the check runs in .venv-sglang's interpreter
(tests/unit/sglang_payload_check.py) on payloads built here; tensor updates are deserialized there with
SGLang's SafeUnpickler and rebuilt with its FlattenedTensorBucket, proving the handles we send are readable.
Skipped when no SGLang interpreter exists (run `bash scripts/bootstrap_sglang.sh`).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from megatron_vr1.rollout import sglang_payloads as P
from megatron_vr1.rollout.engine import GenerationRequest, SamplingParams
from megatron_vr1.rollout.sglang_engine import expand_requests
from megatron_vr1.rollout.sglang_server import SGLangNotInstalled, find_sglang_python
from megatron_vr1.weight_sync.tensor import flattened_message, serialize

CHECKER = Path(__file__).with_name("sglang_payload_check.py")


def _sglang_python() -> str:
    try:
        return find_sglang_python()
    except SGLangNotInstalled as e:
        pytest.skip(str(e))


def _cases(tmp_path: Path) -> tuple[list[dict], dict]:
    png = tmp_path / "img.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    requests = [
        GenerationRequest(request_id="r0", sample_id="s0", prompt="<|vision_start|><|image_pad|><|vision_end|>hi",
                          image=str(png), sampling=SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=8, n=2,
                                                                  stop=("</answer>",), seed=7)),
        GenerationRequest(request_id="r1", sample_id="s1", prompt="text only", image=None,
                          sampling=SamplingParams(temperature=0.0, max_new_tokens=4)),
    ]
    items = expand_requests(requests)
    unseeded = GenerationRequest(request_id="r2", sample_id="s2", prompt=requests[0].prompt, image=str(png),
                                 sampling=SamplingParams(temperature=0.7, max_new_tokens=8, n=4))
    [group] = expand_requests([unseeded], parallel_sampling=True)
    weights = {"lm_head.weight": torch.randn(8, 4), "model.norm.weight": torch.randn(4),
               "visual.merger.mlp.0.bias": torch.randn(6).to(torch.bfloat16)}
    bucket = list(weights.items())
    flat_msg, _flat = flattened_message(bucket, torch.device("cpu"))
    cases = [
        {"kind": "generate", "label": "paths", "payload": P.generate_payload(items, inline_images=False)},
        {"kind": "generate", "label": "base64", "payload": P.generate_payload(items, inline_images=True)},
        {"kind": "generate", "label": "text", "payload": P.generate_payload(items[2:], inline_images=True)},
        {"kind": "generate", "label": "parallel", "payload": P.generate_payload([group], inline_images=True)},
        {"kind": "pause", "payload": P.pause_generation_payload()},
        {"kind": "continue", "payload": P.continue_generation_payload()},
        {"kind": "update_tensor", "label": "flattened",
         "payload": P.update_from_tensor_payload([serialize(flat_msg)], version=3, flattened=True)},
        {"kind": "update_tensor", "label": "per-tensor",
         "payload": P.update_from_tensor_payload([serialize(bucket)], version=3, flattened=False)},
        {"kind": "init_group", "payload": P.init_group_payload(master_address="127.0.0.1", master_port=29555,
                                                               rank_offset=1, world_size=2, group_name="g",
                                                               backend="gloo")},
        {"kind": "update_distributed", "payload": P.update_from_distributed_payload(
            names=["lm_head.weight"], dtypes=["float32"], shapes=[[8, 4]], group_name="g", version=2,
            flattened=True)},
        {"kind": "destroy_group", "payload": P.destroy_group_payload("g")},
        {"kind": "update_disk", "payload": P.update_from_disk_payload("/tmp/ckpt/v00000002", version=2)},
        {"kind": "weight_version", "payload": P.update_weight_version_payload(5)},
        {"kind": "release_memory", "payload": P.memory_payload(None)},
        {"kind": "resume_memory", "payload": P.memory_payload(["weights"])},
    ]
    # The shared-memory handles in the tensor payloads are only valid while these tensors live.
    return cases, {"weights": weights, "keep": (flat_msg, _flat, bucket)}


@pytest.mark.slow  # one subprocess that imports sglang (~15-40 s on a shared 2-core box)
def test_every_payload_is_accepted_by_sglang_io_struct(tmp_path):
    python = _sglang_python()
    cases, alive = _cases(tmp_path)
    (tmp_path / "payloads.json").write_text(json.dumps({"cases": cases}))
    save_file(alive["weights"], str(tmp_path / "expected.safetensors"))
    env = dict(os.environ, SGLANG_USE_CPU_ENGINE="1", OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([python, str(CHECKER), str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(cases), proc.stdout + proc.stderr[-2000:]
    failed = [r for r in results if not r["ok"]]
    assert not failed, failed
    by_label = {(r["kind"], r["label"]): r["detail"] for r in results}
    assert by_label[("generate", "paths")] == "batch of 3"
    assert by_label[("generate", "parallel")] == "batch of 1 x 4 samples"
    assert by_label[("update_tensor", "flattened")] == "3 tensors equal"
    assert by_label[("update_tensor", "per-tensor")] == "3 tensors equal"
    del alive


def test_generate_payload_carries_ids_seeds_and_images(tmp_path):
    png = tmp_path / "a.png"
    png.write_bytes(b"png-bytes")
    req = GenerationRequest(request_id="q", sample_id="s", prompt="p", image=str(png),
                            sampling=SamplingParams(n=3, seed=10, stop=("x",), max_new_tokens=5))
    payload = P.generate_payload(expand_requests([req]), inline_images=True)
    assert payload["rid"] == ["q-0", "q-1", "q-2"]
    assert [s["sampling_seed"] for s in payload["sampling_params"]] == [10, 11, 12]
    assert all(s["stop"] == ["x"] for s in payload["sampling_params"])
    assert payload["image_data"][0] == "data:image/png;base64,cG5nLWJ5dGVz"
    assert P.generate_payload(expand_requests([req]), inline_images=False)["image_data"][0] == str(png)


def test_parallel_sampling_groups_unseeded_requests_and_expands_seeded_ones(tmp_path):
    png = tmp_path / "a.png"
    png.write_bytes(b"png-bytes")
    unseeded = GenerationRequest(request_id="u", sample_id="s", prompt="p", image=str(png),
                                 sampling=SamplingParams(n=3, max_new_tokens=5))
    seeded = GenerationRequest(request_id="k", sample_id="s", prompt="p", sampling=SamplingParams(n=2, seed=4))
    single = GenerationRequest(request_id="o", sample_id="s", prompt="p")
    items = expand_requests([unseeded, seeded, single], parallel_sampling=True)
    assert [(it.rid, it.n, it.ids) for it in items] == [("u", 3, ("u-0", "u-1", "u-2")), ("k-0", 1, ("k-0",)),
                                                         ("k-1", 1, ("k-1",)), ("o-0", 1, ("o-0",))]
    assert [it.seed for it in items[1:3]] == [4, 5]  # seeded samples keep one seed each (n copies would be equal)
    payload = P.generate_payload(items[:1])
    assert payload["text"] == ["p"] and payload["sampling_params"][0]["n"] == 3 and payload["return_logprob"] is True
    assert payload["image_data"] == ["data:image/png;base64,cG5nLWJ5dGVz"]
    # Without parallel sampling every completion is its own item, with the same ids.
    assert [it.rid for it in expand_requests([unseeded])] == ["u-0", "u-1", "u-2"]
    with pytest.raises(ValueError, match="sent on its own"):
        P.generate_payload(items[:2])
    with pytest.raises(ValueError, match="identical samples"):
        P.GenerateItem(rid="x", prompt="p", image=None, temperature=1.0, top_p=1.0, max_new_tokens=2, n=2,
                       result_ids=("x-0", "x-1"), seed=3)


def test_still_missing_retries_only_the_completions_without_a_result():
    from megatron_vr1.rollout.sglang_engine import still_missing

    [group] = expand_requests([GenerationRequest(request_id="g", sample_id="s", prompt="p",
                                                 sampling=SamplingParams(n=4))], parallel_sampling=True)
    assert still_missing(group, {}) is group
    done = {"g-0": object(), "g-2": object()}
    left = still_missing(group, done)
    assert (left.n, left.ids) == (2, ("g-1", "g-3"))
    last = still_missing(group, {**done, "g-1": object()})
    assert (last.rid, last.n, last.ids) == ("g-3", 1, ("g-3",))
    assert still_missing(group, {f"g-{i}": object() for i in range(4)}) is None


def test_bad_inputs_are_refused_with_the_fix(tmp_path):
    req = GenerationRequest(request_id="q", sample_id="s", prompt="p", image=str(tmp_path / "missing.png"))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        P.generate_payload(expand_requests([req]))
    with pytest.raises(ValueError, match="appears twice"):
        expand_requests([req, req])
