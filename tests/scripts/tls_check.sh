#!/usr/bin/env bash
# TLS as a user would check it: curl --http2 through the HTTPS listener, and sslyze
# against Mozilla's "intermediate" configuration. Needs: target/debug/splitgate (built by
# `cargo test`), openssl, curl, python3 with sslyze (pip install sslyze).
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=target/debug/splitgate
work=$(mktemp -d)
cleanup() {
  kill "${upstream_pid:-}" "${proxy_pid:-}" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
trap 'cat "$work/splitgate.log" >&2' ERR

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
up_port=$(free_port); https_port=$(free_port); http_port=$(free_port); admin_port=$(free_port)

# A private CA, and a certificate for localhost it signs (RSA 2048, as most deployments
# still use). sslyze is told to trust the CA, as a client of a private PKI would.
openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=splitgate test CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -keyout "$work/ca.key" -out "$work/ca.pem" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
  -keyout "$work/key.pem" -out "$work/cert.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' > "$work/ext.cnf"
openssl x509 -req -in "$work/cert.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" -CAcreateserial \
  -days 30 -extfile "$work/ext.cnf" -out "$work/cert.pem" 2>/dev/null

mkdir -p "$work/www" && echo "hello over tls" > "$work/www/index.html"
python3 -m http.server "$up_port" --bind 127.0.0.1 --directory "$work/www" >/dev/null 2>&1 &
upstream_pid=$!

cat > "$work/splitgate.toml" <<TOML
[server]
listen = "127.0.0.1:$http_port"
[server.tls]
listen = "127.0.0.1:$https_port"
certs = [{ cert = "$work/cert.pem", key = "$work/key.pem" }]
[admin]
listen = "127.0.0.1:$admin_port"
[state]
dir = "$work/state"
[upstreams.web]
instances = ["127.0.0.1:$up_port"]
[[routes]]
name = "web"
stable = "web"
TOML
"$bin" check -c "$work/splitgate.toml"
"$bin" run -c "$work/splitgate.toml" 2>"$work/splitgate.log" &
proxy_pid=$!
for _ in $(seq 100); do
  curl -sfk -o /dev/null "https://127.0.0.1:$https_port/" && break
  sleep 0.1
done

echo "== curl --http2"
out=$(curl -s --http2 -w '\nHTTP/%{http_version} %{http_code}\n' "https://localhost:$https_port/" --cacert "$work/ca.pem")
echo "$out"
grep -q "hello over tls" <<<"$out"
grep -q "HTTP/2 200" <<<"$out"

echo "== sslyze, Mozilla intermediate configuration"
python3 tests/scripts/sslyze_intermediate.py "localhost:$https_port" "$work/ca.pem"
echo "tls check: 2 passed, 0 failed"
