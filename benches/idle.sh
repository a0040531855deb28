#!/usr/bin/env bash
# Memory per idle keep-alive connection, NGINX, HAProxy and splitgate side by side,
# plain, TLS and h2c, at 1 000 and 9 000 connections (NS=, MODES=, PROXIES= choose).
# See benches/idle.py.
# Needs: apt-get install -y nginx-light haproxy openssl
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
source benches/peer/upstream.sh
trap '[ -n "$started_upstream" ] && kill "$started_upstream" 2>/dev/null || true' EXIT
python3 benches/idle.py "$@"
