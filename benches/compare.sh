#!/usr/bin/env bash
# Side-by-side CPU per request: splitgate against NGINX and HAProxy on loopback.
# Each proxy is pinned to CPU 0; wrk and the nginx upstreams share CPU 1. Prints one JSON
# line per proxy (median over rounds of CPU µs per request, req/s, p50/p99 ms, RSS).
#
#   benches/compare.sh [ROUNDS] [SECONDS] [CONNECTIONS]
#
# Needs: apt-get install -y nginx-light haproxy wrk
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
seconds=${2:-6}
conns=${3:-64}
peer=benches/peer
for tool in nginx wrk taskset; do
  command -v "$tool" >/dev/null || { echo "needs $tool: apt-get install -y nginx-light haproxy wrk" >&2; exit 1; }
done
cargo build --release --quiet
rm -rf /tmp/splitgate-bench-state
candidates=("nginx=18080=nginx -c $PWD/$peer/proxy-nginx.conf")
if command -v haproxy >/dev/null; then
  candidates+=("haproxy=18081=haproxy -f $PWD/$peer/proxy-haproxy.cfg")
fi
candidates+=("splitgate=18084=$PWD/target/release/splitgate run -c $PWD/$peer/splitgate.toml")
python3 "$peer/compare.py" --rounds "$rounds" --seconds "$seconds" --conns "$conns" "${candidates[@]}"
