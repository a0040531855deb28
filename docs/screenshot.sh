#!/usr/bin/env bash
# Regenerates docs/operators-page.png: the browser test (tests/page.rs) runs the demo's
# config, sets weights and trips route "demo" through the page and the admin API, then
# saves what headless Chromium shows. Needs chromium (apt-get install chromium).
set -euo pipefail
cd "$(dirname "$0")/.."
SPLITGATE_REQUIRE_CHROMIUM=1 SPLITGATE_SCREENSHOT="$PWD/docs/operators-page.png" \
  cargo test --quiet --test page
echo "wrote docs/operators-page.png"
