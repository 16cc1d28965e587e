"""The offline Megatron -> HF writer that reads the checkpoint straight into its mapped output shards
(convert/mapped_output.py): the CLI round trip HF -> Megatron -> HF gives every tensor byte for byte, with a
padded vocabulary (copied, not bound), with an unpadded one (bound), tied or not, in one shard or several, and the
files are ordinary safetensors (safetensors' own loader and transformers read them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from convert_tiny import build_tiny_vl, tiny_config  # noqa: E402
from megatron_vr1.convert.mapped_output import _hf_pieces  # noqa: E402
from megatron_vr1.convert.names import Entry  # noqa: E402
from megatron_vr1.parallel.env import free_port  # noqa: E402


def _cli(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "megatron_vr1.cli", "convert", *args], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("tie,vocab,shard", [(False, 500, "5GB"), (True, 512, "5GB"), (False, 512, "40KB")])
def test_round_trip_through_the_mapped_writer_is_byte_identical(tmp_path, tie, vocab, shard):
    hf = build_tiny_vl(tmp_path / "hf", tie=tie, vocab=vocab)
    _cli("hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "mcore"))
    _cli("mcore-to-hf", "--ckpt", str(tmp_path / "mcore"), "--hf-config", str(hf), "--out", str(tmp_path / "back"),
         "--max-shard-size", shard)
    back, original = _tensors(tmp_path / "back"), _tensors(hf)
    assert set(back) == set(original)
    for name, t in original.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name].view(torch.uint8), t.view(torch.uint8)), name
    files = sorted((tmp_path / "back").glob("*.safetensors"))
    if shard == "40KB":
        index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
        assert len(files) > 2 and set(index["weight_map"]) == set(original)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in original.values())
    else:
        assert [f.name for f in files] == ["model.safetensors"]
    assert not list((tmp_path / "back").glob(".tmp*")) and not (tmp_path / "back.tmp").exists()
    for f in files:  # the format's own reader checks the header (offsets contiguous, no gaps, sizes)
        with safe_open(str(f), framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}


def test_only_plain_row_ranges_are_bound():
    from megatron_vr1.convert.arch import arch_from_config

    arch = arch_from_config(tiny_config(vocab=500).to_dict())
    fc1 = torch.empty(2 * arch.intermediate_size, arch.hidden_size)
    pieces, bind = _hf_pieces(Entry("fc1", ("gate", "up"), "gate_up", "gate_up"), fc1, arch)
    assert bind and [n for n, _ in pieces] == ["gate", "up"]
    qkv = torch.empty((arch.num_heads + 2 * arch.num_kv_heads) * arch.head_dim, arch.hidden_size)
    assert not _hf_pieces(Entry("qkv", ("q", "k", "v"), "qkv", "column"), qkv, arch)[1]
    padded = torch.empty(512, arch.hidden_size)  # 500 rows kept: the padding is not part of the output
    assert not _hf_pieces(Entry("emb", ("e",), "vocab", "vocab"), padded, arch)[1]
    assert _hf_pieces(Entry("emb", ("e",), "vocab", "vocab"), torch.empty(500, arch.hidden_size), arch)[1]


BIND_CHECK = """
import json, sys
from pathlib import Path
from megatron_vr1.convert.arch import load_config
from megatron_vr1.convert.mapped_output import MappedHFOutput
from megatron_vr1.convert.session import build, ensure_parallel
hf, out = Path(sys.argv[1]), Path(sys.argv[2])
config = load_config(hf)
ensure_parallel(1, 1)
model = build(config, "float32", 1, 1, 512)
output = MappedHFOutput(model, config, out, 5 * 2**30)
bound = {n: t.data_ptr() == output._bytes[n2].data_ptr()
         for n, t in model.state_dict(keep_vars=True).items() if n.endswith("linear_fc1.weight")
         for n2 in [n.replace("language_model.decoder.layers", "model.layers").replace("linear_fc1", "gate_proj")]}
print("RESULT " + json.dumps({"bound_bytes": output.bound_bytes, "total": output.total_bytes, "fc1": bound}))
"""


def test_parameters_are_bound_to_the_output_mapping(tmp_path):
    """The parameters themselves (not detached aliases) point into the output: that is the whole speed-up."""
    hf = build_tiny_vl(tmp_path / "hf")  # vocab 500 -> padded 512: embedding and head are copied, not bound
    proc = subprocess.run([sys.executable, "-c", BIND_CHECK, str(hf), str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "RANK": "0", "WORLD_SIZE": "1",
                                                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    assert r["fc1"] and all(r["fc1"].values()), r["fc1"]
    unbound = 2 * 500 * 64 * 4 + 2 * (4 + 2 * 2) * 16 * 65 * 4  # embedding + head, QKV weight+bias of 2 layers
    assert r["bound_bytes"] == r["total"] - unbound


def test_no_room_for_the_output_is_a_clear_error_not_a_crash(tmp_path):
    """Blocks are reserved before anything is written through the mapping: a full disk (here: a file-size limit)
    is a ConversionError naming the shard, never a SIGBUS, and leaves no final directory."""
    hf = build_tiny_vl(tmp_path / "hf")
    _cli("hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "mcore"))
    limited = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
               "resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY)); "
               "from megatron_vr1.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", limited, "convert", "mcore-to-hf", "--ckpt", str(tmp_path / "mcore"),
                           "--hf-config", str(hf), "--out", str(tmp_path / "back")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "can't create a" in proc.stderr and "output shard" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "back").exists()
