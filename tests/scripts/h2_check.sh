#!/usr/bin/env bash
# HTTP/2 abuse, then a clean multiplexed load on the same process:
#   rapid reset, CONTINUATION flood, empty DATA flood  -> GOAWAY, bounded memory
#   h2load -c50 -m100 (5 000 streams over a cap of       -> 0 failed
#   1 024 upstream connections: the queue drains FIFO)
# Needs: target/debug/splitgate, python3 with h2 (pip install h2), h2load (nghttp2-client).
set -euo pipefail
cd "$(dirname "$0")/../.."
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port); admin=$(free_port)
target/debug/splitgate demo --port "$port" --admin-port "$admin" >/tmp/splitgate-h2check.out 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  curl -sf -o /dev/null "http://127.0.0.1:$port/" && break
  sleep 0.1
done
python3 tests/scripts/h2_abuse.py "127.0.0.1:$port" "$pid"
out=$(h2load -c50 -m100 -n 20000 "http://127.0.0.1:$port/")
echo "$out" | grep -E "requests:|finished in"
if ! echo "$out" | grep -q "20000 succeeded, 0 failed, 0 errored, 0 timeout"; then
  echo "h2load saw failures; the proxy's warnings:"
  grep -E 'WARN|ERROR' /tmp/splitgate-h2check.out | sort | uniq -c | sort -rn | head -20
  exit 1
fi
echo "h2 check: 4 passed, 0 failed"
