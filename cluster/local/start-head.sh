#!/usr/bin/env bash
# A local Ray head on 127.0.0.1 for development: submit jobs to it as to a real cluster.
#   bash cluster/local/start-head.sh            # prints the dashboard address
#   bco-ray submit --address http://127.0.0.1:8265 --config configs/demo.yaml
#   bash cluster/local/start-head.sh stop       # note: `ray stop` stops every Ray process of this user
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
source scripts/setup.sh
# Without this Ray binds the host's external address even when given 127.0.0.1.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
TEMP=${BCO_RAY_HEAD_TEMP:-/tmp/bco-ray-head}
if [ "${1:-start}" = stop ]; then
  ray stop
  rm -rf "$TEMP"   # a temp dir left behind makes the next ray.init join a dead cluster
  exit 0
fi
ray start --head --node-ip-address 127.0.0.1 --port "${BCO_RAY_HEAD_PORT:-6379}" \
    --dashboard-host 127.0.0.1 --dashboard-port "${BCO_RAY_DASHBOARD_PORT:-8265}" \
    --num-cpus "${BCO_RAY_HEAD_CPUS:-$(nproc)}" --temp-dir "$TEMP"
echo "dashboard / Jobs API: http://127.0.0.1:${BCO_RAY_DASHBOARD_PORT:-8265}"
echo "token auth is on (Ray 2.60's default); the token is in ~/.ray/auth_token"
