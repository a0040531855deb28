#!/usr/bin/env bash
# Checks deploy/systemd/splitgate.service as systemd reads it: `systemd-analyze verify`
# (unknown keys, bad values, a missing binary) with the unit pointed at the built
# binary, and `systemd-analyze security` whose exposure must stay "OK" (below 3.0).
set -euo pipefail
cd "$(dirname "$0")/../.."
bin="$PWD/target/debug/splitgate"
[ -x "$bin" ] || { echo "build first: cargo build" >&2; exit 1; }
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
sed "s#/usr/local/bin/splitgate#$bin#g" deploy/systemd/splitgate.service > "$dir/splitgate.service"
systemd-analyze verify "$dir/splitgate.service"
exposure=$(systemd-analyze security --offline=yes "$dir/splitgate.service" | grep -oE 'exposure level for splitgate.service: [0-9.]+' | grep -oE '[0-9.]+$')
echo "systemd unit verified; exposure $exposure"
awk -v e="$exposure" 'BEGIN { exit !(e < 3.0) }' || { echo "exposure $exposure is not below 3.0" >&2; exit 1; }
