#!/usr/bin/env bash
# Checks examples/compose without Docker: the compose file against the Compose
# specification's schema, every file it mounts from this repository exists, and its
# splitgate config passes `splitgate check`.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin="$PWD/target/debug/splitgate"
[ -x "$bin" ] || { echo "build first: cargo build" >&2; exit 1; }
dir=examples/compose
check-jsonschema --builtin-schema vendor.compose-spec "$dir/docker-compose.yml"
python3 - "$dir" <<'PY'
import os, sys, yaml
root = sys.argv[1]
compose = yaml.safe_load(open(os.path.join(root, "docker-compose.yml")))
missing = []
for name, service in compose["services"].items():
    for volume in service.get("volumes", []):
        source = volume.split(":")[0]
        if source.startswith("."):
            if not os.path.exists(os.path.join(root, source)):
                missing.append(f"{name}: {source}")
if missing:
    sys.exit("mounted files missing: " + ", ".join(missing))
PY
SPLITGATE_ADMIN_TOKEN=check "$bin" check -c "$dir/splitgate.toml"
echo "examples/compose: schema, mounts and config valid"
