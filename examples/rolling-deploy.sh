#!/usr/bin/env bash
# Rolling deploy: for each instance of UPSTREAM in turn, take it out of service and
# wait until nothing is in flight to it, run DEPLOY_CMD ADDR (stop, install, start),
# then put it back and wait until it passes its health checks and serves again. Any
# refusal, failed deploy or timeout stops the script with a non-zero exit, leaving the
# instance drained.
#   rolling-deploy.sh UPSTREAM DEPLOY_CMD ADDR...
set -euo pipefail
upstream=$1 deploy=$2; shift 2
: "${SPLITGATE_ADMIN:=http://127.0.0.1:9901}"      # and SPLITGATE_ADMIN_TOKEN if set
export SPLITGATE_ADMIN
for addr in "$@"; do
  splitgate instance drain "$upstream" "$addr" --wait --timeout 2m
  "$deploy" "$addr"
  splitgate instance ready "$upstream" "$addr" --wait --timeout 2m
done
splitgate upstreams
