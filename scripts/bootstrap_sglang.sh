#!/usr/bin/env bash
# Create or refresh .venv-sglang: the SGLang 0.5.10.post1 rollout server for CPU hosts (shared/recipes/cpu-stack.md §2).
#
# Why a separate venv: SGLang 0.5.10.post1 needs transformers==5.3.0 exactly (5.12+ breaks its Qwen2.5-VL vision
# rotary), while the trainer pins transformers 5.23.0. Why not `pip install sglang`: that pulls torch 2.9.1 and
# flashinfer (CUDA). So: sglang with --no-deps, the light runtime deps pinned here, the same torch as the main
# venv (2.14.1 runs sglang 0.5.10's CPU engine), and a python-only `sgl_kernel` generated from the
# sglang-kernel==0.4.1 wheel (its compiled ops are CUDA-only; on CPU without AMX sglang never calls them).
#
# Idempotent: a stamp holds a hash of this script; a second run returns in about a second.
# GPU hosts don't need this: install `sglang==0.5.10.post1` normally (pyproject extra "sglang").
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SGLANG_VENV:-.venv-sglang}
stamp="$VENV/.sglang-stamp"
want=$(sha256sum scripts/bootstrap_sglang.sh | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi

find_python() {
  for cand in "${PYTHON:-}" python3.12 /root/.pyenv/versions/3.12.1/bin/python3.12 /usr/bin/python3.12; do
    [ -n "$cand" ] || continue
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
      command -v "$cand"; return 0
    fi
  done
  echo "bootstrap_sglang: no Python 3.12 found; install it or set PYTHON=/path/to/python3.12" >&2
  return 1
}

PY=$(find_python)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
pip_q() { "$VPY" -m pip install -q --progress-bar off "$@"; }
echo "bootstrap_sglang: installing SGLang 0.5.10.post1 (CPU engine) into $VENV (first run: ~3 GB, a few minutes)"
pip_q --upgrade pip
# torch first, so that nothing below resolves a different one.
pip_q torch==2.14.1 torchvision==0.29.1
pip_q --no-deps sglang==0.5.10.post1
# transformers 5.3.0 is sglang 0.5.10's own pin; the rest are the runtime deps its io_struct and HTTP server
# import (found one by one in cpu-stack §2a), pinned to the versions this was tested with.
pip_q transformers==5.3.0 torch==2.14.1 openai==2.6.1 \
  pybase64==1.5.1 requests==2.34.2 ipython==9.18.1 aiohttp==3.14.5 orjson==3.13.0 starlette==1.10.0 \
  pyzmq==27.3.0 partial-json-parser==0.2.1.1.post7 dill==0.4.1 sentencepiece==0.2.3 \
  compressed-tensors==0.20.0 gguf==0.19.0 msgspec==0.22.0 uvicorn==0.54.0 uvloop==0.23.0 fastapi==0.165.0 \
  setproctitle==1.3.8 einops==0.8.2 jsonschema==4.26.0 python-multipart==0.0.34 psutil==7.2.2 \
  pillow==13.0.0 safetensors==0.8.0 numpy==2.5.5 pydantic==2.14.3 interegular==0.3.3

# The python-only sgl_kernel: the .py files of the sglang-kernel 0.4.1 wheel (its .so files need CUDA 12), with the
# op-library load made optional. Written straight into the venv's site-packages so no PYTHONPATH is needed.
site=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$VPY" -m pip download -q --no-deps sglang-kernel==0.4.1 -d "$tmp"
"$VPY" - "$tmp" "$site" <<'EOF'
import pathlib, shutil, sys, zipfile
tmp, site = map(pathlib.Path, sys.argv[1:])
wheel = next(tmp.glob("sglang_kernel-0.4.1-*.whl"))
dest = site / "sgl_kernel"
shutil.rmtree(dest, ignore_errors=True)
with zipfile.ZipFile(wheel) as zf:
    for name in zf.namelist():
        if name.startswith("sgl_kernel/") and name.endswith(".py"):
            target = site / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(name))
init = dest / "__init__.py"
src = init.read_text()
old_load = "common_ops = _load_architecture_specific_ops()\n"
old_preload = "if torch.version.cuda is not None:\n    _preload_cuda_library()"
if old_load not in src or old_preload not in src:
    sys.exit(f"bootstrap_sglang: {init} does not look like sglang-kernel 0.4.1's; the shim patch needs updating")
src = src.replace(old_load, (
    "try:\n    common_ops = _load_architecture_specific_ops()\n"
    "except ImportError:  # CPU host: python-only sgl_kernel (scripts/bootstrap_sglang.sh)\n    common_ops = None\n"))
src = src.replace(old_preload, "if torch.version.cuda is not None and common_ops is not None:\n    _preload_cuda_library()")
init.write_text(src)
(dest / "SHIM").write_text("python-only sgl_kernel generated from sglang-kernel==0.4.1 by scripts/bootstrap_sglang.sh\n")
EOF
# Smoke check: the request dataclasses and the serializer import (the server itself is checked by the tests).
SGLANG_USE_CPU_ENGINE=1 "$VPY" -c 'import sglang.srt.managers.io_struct, sglang.srt.utils.common; import transformers; assert transformers.__version__ == "5.3.0", transformers.__version__'
echo "$want" > "$stamp"
echo "bootstrap_sglang: $VENV ready"
