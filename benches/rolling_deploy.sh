#!/usr/bin/env bash
# A rolling deploy under load: three nginx instances (v1) behind splitgate with HTTP
# health checks, wrk sending traffic the whole time, and examples/rolling-deploy.sh
# replacing each instance in turn by a new nginx (v2) on the same address: drain
# --wait, graceful stop, start, ready --wait. Prints wrk's output (look for non-2xx
# and socket errors) and what serves afterwards.
#   benches/rolling_deploy.sh            (DURATION=40 by default, seconds of wrk)
# Needs: apt-get install -y nginx-light wrk
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
export PATH="$PWD/target/release:$PATH"
work=$(mktemp -d /tmp/splitgate-rolling.XXXXXX)
ports=(19301 19302 19303)
proxy=19300 admin=19399
duration=${DURATION:-40}
pids=()
cleanup() {
  for port in "${ports[@]}"; do
    [ -f "$work/$port/nginx.pid" ] && kill "$(cat "$work/$port/nginx.pid")" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# One nginx per address, serving "$version" and /healthz.
start_nginx() {
  local port=$1 version=$2 dir="$work/$1"
  mkdir -p "$dir"
  cat > "$dir/nginx.conf" <<CONF
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$port;
    location = /healthz { return 200 "ok\n"; }
    location / { return 200 "$version\n"; }
  }
}
CONF
  nginx -c "$dir/nginx.conf"
}

# The deploy step examples/rolling-deploy.sh runs for each address: stop the old nginx
# gracefully (it finishes what it has), start v2 on the same address.
cat > "$work/deploy" <<DEPLOY
#!/usr/bin/env bash
set -euo pipefail
port=\${1##*:}
dir="$work/\$port"
pid=\$(cat "\$dir/nginx.pid")
kill -QUIT "\$pid"
while kill -0 "\$pid" 2>/dev/null; do sleep 0.05; done
$(declare -f start_nginx)
work="$work"
start_nginx "\$port" v2
echo "deployed v2 to \$1"
DEPLOY
chmod +x "$work/deploy"

for port in "${ports[@]}"; do start_nginx "$port" v1; done
cat > "$work/splitgate.toml" <<CONF
[server]
listen = "127.0.0.1:$proxy"
access_log = false
[admin]
listen = "127.0.0.1:$admin"
[state]
dir = "$work/state"
[upstreams.app]
instances = ["127.0.0.1:${ports[0]}", "127.0.0.1:${ports[1]}", "127.0.0.1:${ports[2]}"]
[upstreams.app.health]
path = "/healthz"
interval = "1s"
timeout = "500ms"
rise = 2
fall = 2
[[routes]]
name = "main"
stable = "app"
CONF
splitgate run -c "$work/splitgate.toml" 2> "$work/splitgate.log" &
pids+=($!)
export SPLITGATE_ADMIN="http://127.0.0.1:$admin"
until curl -sf "$SPLITGATE_ADMIN/readyz" >/dev/null; do sleep 0.1; done
sleep 1.5   # the first health checks

wrk -t2 -c32 -d"${duration}s" "http://127.0.0.1:$proxy/" > "$work/wrk.txt" &
wrk_pid=$!
sleep 3
started=$(date +%s.%N)
examples/rolling-deploy.sh app "$work/deploy" "127.0.0.1:${ports[0]}" "127.0.0.1:${ports[1]}" "127.0.0.1:${ports[2]}"
echo "rolling deploy took $(echo "$(date +%s.%N) - $started" | bc) s"
wait "$wrk_pid"
echo "--- wrk (the whole run, deploy included) ---"
cat "$work/wrk.txt"
echo "--- served now (10 requests) ---"
for _ in $(seq 10); do curl -s "http://127.0.0.1:$proxy/"; done | sort | uniq -c
