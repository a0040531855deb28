#!/usr/bin/env bash
# Load checks beyond CPU per request: weight changes under load, RSS per idle
# connection, and h2c multiplexed throughput against nginx. See benches/load_checks.py.
#   benches/load_checks.sh [weights] [idle] [slowloris] [h2] [takeover] [upgrade]
# Needs: apt-get install -y nginx-light wrk nghttp2-client
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
source benches/peer/upstream.sh
trap '[ -n "$started_upstream" ] && kill "$started_upstream" 2>/dev/null || true' EXIT
python3 benches/load_checks.py "$@"
