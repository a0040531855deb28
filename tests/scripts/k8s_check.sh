#!/usr/bin/env bash
# Checks deploy/kubernetes as a cluster would see it, offline: every manifest against
# the Kubernetes API schemas (kubernetes-validate, strict: unknown fields are errors),
# the ServiceMonitor against the vendored schema of the fields it uses (the Prometheus
# Operator's CRD is not in those schemas), and the ConfigMap's splitgate.toml with
# `splitgate check`.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin="$PWD/target/debug/splitgate"
[ -x "$bin" ] || { echo "build first: cargo build" >&2; exit 1; }
dir=deploy/kubernetes
out=$(kubernetes-validate --strict "$dir"/configmap.yaml "$dir"/deployment.yaml "$dir"/service.yaml "$dir"/pdb.yaml 2>&1)
echo "$out"
if grep -qE '^(WARN|ERROR)' <<<"$out"; then
  echo "kubernetes-validate: not every manifest passed" >&2
  exit 1
fi
check-jsonschema --schemafile "$dir"/schemas/servicemonitor.json "$dir"/servicemonitor.yaml
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["data"]["splitgate.toml"])' \
  "$dir"/configmap.yaml > "$tmp/splitgate.toml"
SPLITGATE_ADMIN_TOKEN=check "$bin" check -c "$tmp/splitgate.toml"
echo "deploy/kubernetes: manifests and config valid"
