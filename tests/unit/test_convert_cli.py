"""``megatron-vr1 convert``: user errors print one clear line (file, tensor, fix) and exit 2, no traceback."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from megatron_vr1.cli import main

CONFIG = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 16, "intermediate_size": 32,
          "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 1, "vocab_size": 100}


def _hf_dir(tmp_path, truncate: bool = False):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CONFIG))
    save_file({"model.embed_tokens.weight": torch.randn(100, 16), "model.norm.weight": torch.ones(16)},
              str(d / "model.safetensors"))
    if truncate:
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[:-64])
    return d


def test_hf_to_mcore_truncated_file_is_a_clean_error(tmp_path, capsys):
    hf = _hf_dir(tmp_path, truncate=True)
    rc = main(["convert", "hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "model.safetensors: tensor 'model.norm.weight' ends at byte" in err and "truncated" in err


@pytest.mark.parametrize("argv,needle", [
    (["--tp", "3"], "--tp 3 is invalid: it must divide the 4 attention heads and the 2 key/value heads"),
    (["--pp", "2"], "--pp 2 is invalid: it must divide the 1 decoder layers for an even split; or split unevenly: "
                    "every stage needs a layer: use at most 1 pipeline stages"),
])
def test_hf_to_mcore_bad_layout(tmp_path, capsys, argv, needle):
    rc = main(["convert", "hf-to-mcore", "--hf", str(_hf_dir(tmp_path)), "--out", str(tmp_path / "o"), *argv])
    assert rc == 2 and needle in capsys.readouterr().err


def test_missing_inputs_name_the_path(tmp_path, capsys):
    rc = main(["convert", "mcore-to-hf", "--ckpt", str(tmp_path / "nope"), "--hf-config", str(_hf_dir(tmp_path)),
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "nope: no torch_dist checkpoint here" in err and "Traceback" not in err
    rc = main(["convert", "hf-to-mcore", "--hf", str(tmp_path / "absent"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "absent/config.json: not found" in capsys.readouterr().err
