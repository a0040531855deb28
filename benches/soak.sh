#!/usr/bin/env bash
# Soak: a moderate steady load (wrk, 32 connections, ~2 000 req/s paced by
# benches/peer/paced.lua) for MINUTES minutes, sampling splitgate's RSS every 10 s.
# Prints the samples and the change from the first minute to the last. Not run in CI.
#   benches/soak.sh [MINUTES]
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-10}
cargo build --release --quiet
source benches/peer/upstream.sh
rm -rf /tmp/splitgate-bench-state
RUST_LOG=warn target/release/splitgate run -c benches/peer/splitgate.toml 2>/tmp/splitgate-soak.log &
proxy=$!
trap 'kill $proxy ${started_upstream:-} 2>/dev/null || true' EXIT
sleep 1
wrk -t1 -c32 -d"${minutes}m" -s benches/peer/paced.lua http://127.0.0.1:18084/ > /tmp/splitgate-soak-wrk.txt &
load=$!
samples=()
while kill -0 "$load" 2>/dev/null; do
  rss=$(awk '/VmRSS/ {print $2}' "/proc/$proxy/status")
  samples+=("$rss")
  echo "$(date +%T) rss_kib=$rss"
  sleep 10
done
cat /tmp/splitgate-soak-wrk.txt
python3 - "${samples[@]}" <<'PY'
import sys
s = [int(x) for x in sys.argv[1:]]
first = sum(s[:6]) / max(len(s[:6]), 1)
last = sum(s[-6:]) / max(len(s[-6:]), 1)
print(f"rss first minute {first:.0f} KiB, last minute {last:.0f} KiB, change {100 * (last - first) / first:+.1f} %")
PY
