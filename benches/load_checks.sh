#!/usr/bin/env bash
# Load checks beyond CPU per request: weight changes under load, RSS per idle
# connection, and h2c multiplexed throughput against nginx. See benches/load_checks.py.
#   benches/load_checks.sh [weights] [idle] [slowloris] [h2] [takeover]
# Needs: apt-get install -y nginx-light wrk nghttp2-client
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
started_upstream=""
if ! (exec 3<>/dev/tcp/127.0.0.1/19001) 2>/dev/null; then
  taskset -c 1 nginx -c "$PWD/benches/peer/upstream-nginx.conf" &
  started_upstream=$!
  sleep 0.5
fi
trap '[ -n "$started_upstream" ] && kill "$started_upstream" 2>/dev/null || true' EXIT
python3 benches/load_checks.py "$@"
