#!/usr/bin/env bash
# The main job on the embedded default: local Ray, local files, SmolLM2-135M-Instruct.
# Extra arguments are config overrides, e.g.: bash scripts/demo.sh --run.seed 3
set -euo pipefail
# The demo scores with transformers on CPU: it does not need the 3 GB vLLM CPU build.
export BCO_RAY_VLLM=${BCO_RAY_VLLM:-0}
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec bco-ray align --config configs/demo.yaml "$@"
