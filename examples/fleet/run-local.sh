#!/usr/bin/env bash
# The fleet of docker-compose.yml on this machine, without Docker: 3 etcd members
# (Debian: apt-get install etcd-server), two app versions, 3 splitgate replicas.
#   examples/fleet/run-local.sh            # prints "fleet up" when ready; Ctrl-C stops it
# Replicas: proxy 127.0.0.1:8081..8083, admin 127.0.0.1:9911..9913. Try:
#   curl -H 'x-user-id: alice' 127.0.0.1:8081/
#   target/release/splitgate weight app 50 --admin http://127.0.0.1:9911
#   target/release/splitgate status --admin http://127.0.0.1:9913     # the same 50 %
#   target/release/splitgate fleet status --admin http://127.0.0.1:9912
# FLEET_DIR (default: a temporary folder) keeps etcd's data and each replica's state.
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v etcd >/dev/null || { echo "needs etcd: apt-get install etcd-server" >&2; exit 1; }
cargo build --release --quiet
bin=$PWD/target/release/splitgate
dir=${FLEET_DIR:-$(mktemp -d /tmp/splitgate-fleet.XXXXXX)}
mkdir -p "$dir"
pids=()
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true
  # etcd members stopping together may wait on each other for a while.
  for _ in $(seq 100); do
    kill -0 "${pids[@]}" 2>/dev/null || break
    sleep 0.1
  done
  kill -9 "${pids[@]}" 2>/dev/null || true
  if [ -z "${FLEET_DIR:-}" ]; then rm -rf "$dir"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cluster="etcd-1=http://127.0.0.1:12380,etcd-2=http://127.0.0.1:22380,etcd-3=http://127.0.0.1:32380"
for i in 1 2 3; do
  etcd --name "etcd-$i" --data-dir "$dir/etcd-$i" \
    --listen-client-urls "http://127.0.0.1:${i}2379" --advertise-client-urls "http://127.0.0.1:${i}2379" \
    --listen-peer-urls "http://127.0.0.1:${i}2380" --initial-advertise-peer-urls "http://127.0.0.1:${i}2380" \
    --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token splitgate-example \
    --auto-compaction-mode periodic --auto-compaction-retention 1h \
    --logger zap --log-level error >"$dir/etcd-$i.log" 2>&1 &
  pids+=($!)
done

# The two app versions: "app vN" with status 200 (APP_V2_STATUS=500 makes v2 fail,
# to watch the fleet's SLO judge pull it).
for v in 1 2; do
  status=200
  [ "$v" = 2 ] && status=${APP_V2_STATUS:-200}
  python3 - "500$v" "app v$v" "$status" >/dev/null 2>&1 <<'PY' &
import http.server, sys
port, text, status = int(sys.argv[1]), sys.argv[2].encode() + b"\n", int(sys.argv[3])
class App(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.send_response(status)
        self.send_header("content-length", str(len(text)))
        self.end_headers()
        self.wfile.write(text)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", port), App).serve_forever()
PY
  pids+=($!)
done

for i in 1 2 3; do
  sed -e "s|0.0.0.0:8080|127.0.0.1:808$i|" -e "s|0.0.0.0:9901|127.0.0.1:991$i|" \
      -e "s|/var/lib/splitgate/state|$dir/edge-$i|" \
      -e "s|http://etcd-\([123]\):2379|http://127.0.0.1:\12379|g" \
      -e "s|app-v\([12]\):5678|127.0.0.1:500\1|" \
      -e "s|^cluster = \"example\"|cluster = \"example\"\nreplica = \"edge-$i\"|" \
      examples/fleet/splitgate.toml >"$dir/edge-$i.toml"
  "$bin" run -c "$dir/edge-$i.toml" >"$dir/edge-$i.log" 2>&1 &
  pids+=($!)
done

for i in 1 2 3; do
  for _ in $(seq 100); do
    curl -fs "http://127.0.0.1:991$i/readyz" >/dev/null 2>&1 && break
    sleep 0.1
  done
  curl -fs "http://127.0.0.1:991$i/readyz" >/dev/null || { echo "edge-$i did not start; see $dir/edge-$i.log" >&2; exit 1; }
done
# Ready also means "serving its saved state because the store is unreachable": wait
# until every replica reaches the store (etcd may still be forming its cluster).
for i in 1 2 3; do
  for _ in $(seq 150); do
    "$bin" fleet status --admin "http://127.0.0.1:991$i" >/dev/null 2>&1 && break
    sleep 0.2
  done
  "$bin" fleet status --admin "http://127.0.0.1:991$i" >/dev/null 2>&1 || { echo "edge-$i cannot reach etcd; see $dir/edge-$i.log and $dir/etcd-*.log" >&2; exit 1; }
done
echo "fleet up in $dir: proxies 127.0.0.1:8081..8083, admin 127.0.0.1:9911..9913"
"$bin" fleet status --admin http://127.0.0.1:9911 || true
[ "${FLEET_UP_ONLY:-}" = 1 ] && exit 0
echo "Ctrl-C stops the fleet."
wait
