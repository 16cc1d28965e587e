#!/usr/bin/env bash
# The GPU acceptance run (README: "On a GPU machine"): HF-vs-Megatron parity, GRPO steps, TE / FP8 kernels and
# TP=2, printed as one table (tools/gpu_acceptance.py says what each row checks). About 5 minutes on one H100.
#
#   bash tools/gpu_acceptance.sh [--out DIR] [--sections parity,grpo,kernels,tp2]
#   bash tools/gpu_acceptance.sh --cpu            # the tiny CPU rehearsal (make test runs it)
#   bash tools/gpu_acceptance.sh --wheels DIR     # first install carried wheels (hosts without a network)
#
# Python: $PYTHON, else the project's .venv, else python3 (torch, transformers, megatron-core must import).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels)
      [ -d "${2:-}" ] || { echo "gpu_acceptance.sh: --wheels needs a directory of .whl files" >&2; exit 2; }
      site=${TMPDIR:-/tmp}/megatron-vr1-wheels
      "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$2"/*.whl
      export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
      shift 2;;
    *) args+=("$1"); shift;;
  esac
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" tools/gpu_acceptance.py "${args[@]}"
