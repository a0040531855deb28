#!/usr/bin/env bash
# `promtool check metrics` on a live /metrics, as Prometheus's own linter reads it: the
# demo with traffic on both sides (and an error), so every family has samples.
# Needs: target/debug/splitgate, curl, promtool (Debian's prometheus package).
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=target/debug/splitgate
work=$(mktemp -d)
cleanup() {
  kill "${demo_pid:-}" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
trap 'cat "$work/demo.log" >&2' ERR

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port); admin_port=$(free_port)
"$bin" demo --port "$port" --admin-port "$admin_port" >"$work/demo.log" 2>&1 &
demo_pid=$!
for _ in $(seq 100); do
  curl -fsS "http://127.0.0.1:$admin_port/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
for i in $(seq 50); do
  curl -s -o /dev/null -H "X-User-Id: user$i" "http://127.0.0.1:$port/"
done
curl -s -o /dev/null "http://127.0.0.1:$port/" -H "Host: nowhere" || true
curl -fsS "http://127.0.0.1:$admin_port/metrics" >"$work/metrics.txt"
grep -q '^splitgate_requests_total' "$work/metrics.txt"
promtool check metrics <"$work/metrics.txt"
echo "promtool check metrics: ok ($(grep -c '^# HELP' "$work/metrics.txt") families)"
