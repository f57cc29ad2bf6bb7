#!/usr/bin/env bash
# The test suite. Extra arguments go to pytest, e.g.: bash scripts/test.sh -m "not slow" -x
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
# Ray's Unix sockets need short paths: pytest's default basetemp is too long.
base=/tmp/bcrt-$$
trap 'rm -rf "$base"' EXIT
# The slowest tests are printed so that the 40-minute CI budget can be kept in view.
exec python -m pytest --basetemp="$base" --durations=60 "$@"
