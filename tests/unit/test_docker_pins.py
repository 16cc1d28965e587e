"""The Docker image pins the same versions as pyproject.toml (no Docker engine runs on these machines)."""

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _pins() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"]) + [d for group in project["optional-dependencies"].values() for d in group]
    out = {}
    for spec in specs:
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]+\])?==([^;\s]+)", spec.strip())
        assert m, f"pyproject.toml: {spec!r} is not an exact pin"
        out[m.group(1).lower()] = m.group(3)
    return out


def _dockerfile_args() -> dict[str, str]:
    text = (REPO / "docker" / "Dockerfile").read_text()
    return dict(re.findall(r"^ARG ([A-Z_]+)=(\S+)$", text, flags=re.M))


def test_dockerfile_versions_equal_pyproject_pins():
    pins, args = _pins(), _dockerfile_args()
    assert args["MEGATRON_CORE_VERSION"] == pins["megatron-core"]
    assert args["TRANSFORMER_ENGINE_VERSION"] == pins["transformer-engine"]
    assert args["SGLANG_VERSION"] == pins["sglang"]


def test_sglang_environment_matches_cpu_bootstrap():
    # The image's SGLang venv and the CPU .venv-sglang must use the same transformers as sglang's own pin.
    args = _dockerfile_args()
    bootstrap = (REPO / "scripts" / "bootstrap_sglang.sh").read_text()
    assert f"transformers=={args['SGLANG_TRANSFORMERS_VERSION']}" in bootstrap
    assert f"sglang=={args['SGLANG_VERSION']}" in bootstrap


def test_dockerfile_keeps_the_base_torch_and_installs_the_package():
    text = (REPO / "docker" / "Dockerfile").read_text()
    assert 'not d.startswith("torch==")' in text  # the NGC CUDA torch is never replaced
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, flags=re.M) and "nvcr.io/nvidia/pytorch" in text
    for path in ("pyproject.toml", "megatron_vr1", "scripts", "examples", "tools"):
        assert (REPO / path).exists(), f"the Dockerfile copies {path}, which is missing"
