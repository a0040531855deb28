#!/usr/bin/env bash
# HTTP/2 to upstreams, CPU per request side by side (issue: upstream protocols and gRPC).
#   A. h2c clients (h2load) -> proxy -> h2c upstream: splitgate (protocol = "h2c")
#      against HAProxy (proto h2 both ways).
#   B. HTTP/1.1 clients (wrk) -> proxy: splitgate to an h2c upstream, splitgate to an
#      HTTP/1.1 upstream, and NGINX to an HTTP/1.1 upstream (it has no HTTP/2 to
#      upstreams outside grpc_pass).
# Each proxy is pinned to CPU 0; the client and the upstream nginx share CPU 1.
#
#   benches/h2_upstream.sh [ROUNDS] [SECONDS]
#
# Needs: apt-get install -y nginx-light haproxy wrk nghttp2-client
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
seconds=${2:-6}
peer=benches/peer
for tool in nginx haproxy wrk h2load taskset; do
  command -v "$tool" >/dev/null || { echo "needs $tool: apt-get install -y nginx-light haproxy wrk nghttp2-client" >&2; exit 1; }
done
cargo build --release --quiet
rm -rf /tmp/splitgate-bench-h2-state /tmp/splitgate-bench-h1-state
source "$peer/upstream.sh"
taskset -c 1 nginx -c "$PWD/$peer/upstream-nginx-h2c.conf" &
h2c_upstream=$!
trap 'kill $h2c_upstream ${started_upstream:-} 2>/dev/null || true' EXIT
sleep 0.5
sg="$PWD/target/release/splitgate run -c"
echo "# A. h2c clients, h2c upstream"
python3 benches/h2_upstream.py --rounds "$rounds" --seconds "$seconds" \
  "haproxy-h2=h2load=18181=haproxy -f $PWD/$peer/proxy-haproxy-h2.cfg" \
  "splitgate-h2c=h2load=18184=$sg $PWD/$peer/splitgate-h2c.toml"
echo "# B. HTTP/1.1 clients"
python3 benches/h2_upstream.py --rounds "$rounds" --seconds "$seconds" \
  "nginx-to-h1=wrk=18086=nginx -c $PWD/$peer/proxy-nginx-single.conf" \
  "splitgate-to-h1=wrk=18185=$sg $PWD/$peer/splitgate-h1.toml" \
  "splitgate-to-h2c=wrk=18184=$sg $PWD/$peer/splitgate-h2c.toml"
