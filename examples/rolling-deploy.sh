#!/usr/bin/env bash
# Rolling deploy: for each instance of UPSTREAM in turn, take it out of service and
# wait until nothing is in flight to it, run DEPLOY_CMD ADDR (stop, install, start),
# then put it back and wait until it passes its health checks and serves again. Any
# refusal, failed deploy or timeout stops the script with a non-zero exit: the instance
# is left drained, or (when the new one never passes its checks) ready but pending, so
# it gets no traffic either way. DEPLOY_CMD should fail unless the new version runs.
#   rolling-deploy.sh UPSTREAM DEPLOY_CMD ADDR...   (ADDR: ip:port, as `splitgate upstreams` lists)
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 UPSTREAM DEPLOY_CMD ADDR..." >&2
  exit 2
fi
upstream=$1 deploy=$2; shift 2
: "${SPLITGATE_ADMIN:=http://127.0.0.1:9901}"      # and SPLITGATE_ADMIN_TOKEN if set
export SPLITGATE_ADMIN
for addr in "$@"; do
  splitgate instance drain "$upstream" "$addr" --wait --timeout 2m
  "$deploy" "$addr"
  splitgate instance ready "$upstream" "$addr" --wait --timeout 2m
done
splitgate upstreams
