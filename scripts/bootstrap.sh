#!/usr/bin/env bash
# Create or refresh .venv (Python 3.12) with the pinned dependencies. Idempotent: a second run only
# compares a hash of pyproject.toml and returns in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
find_python() {
  for cand in "${PYTHON:-}" python3.12 /root/.pyenv/versions/3.12.1/bin/python3.12 /usr/bin/python3.12; do
    [ -n "$cand" ] || continue
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
      command -v "$cand"; return 0
    fi
  done
  echo "bootstrap: no Python 3.12 found; install it or set PYTHON=/path/to/python3.12" >&2
  return 1
}
stamp="$VENV/.megatron-vr1-stamp"
want=$( (cat pyproject.toml scripts/bootstrap.sh) | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi
PY=$(find_python)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
echo "bootstrap: installing pinned dependencies into $VENV (first run: ~3 GB download, a few minutes)"
"$VENV/bin/python" -m pip install -q --progress-bar off -e ".[dev]"
echo "$want" > "$stamp"
echo "bootstrap: $VENV ready"
