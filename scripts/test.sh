#!/usr/bin/env bash
# The whole test suite: fetch the real model and text (cached, checksummed), then run every
# Rust test in release mode (numerics-heavy tests are slow unoptimized). No Python is needed
# at test time; golden fixtures are committed (see docs/golden.md to regenerate them).
#
# A missing asset fails the tests that need it. `AUTOQUANT_REQUIRE_ASSETS=0 scripts/test.sh`
# lets them skip instead (for a machine that cannot fetch the assets); the skipped tests are
# then counted and listed at the end, so a green run that checked less says so.
set -euo pipefail
cd "$(dirname "$0")/.."
AUTOQUANT_REQUIRE_ASSETS="${AUTOQUANT_REQUIRE_ASSETS:-1}"
export AUTOQUANT_REQUIRE_ASSETS
if [ "$AUTOQUANT_REQUIRE_ASSETS" = 0 ]; then
  AUTOQUANT_ASSETS="$(scripts/fetch_assets.sh | tail -n 1)" ||
    echo "test.sh: assets not fetched; the tests that need them will be skipped" >&2
else
  AUTOQUANT_ASSETS="$(scripts/fetch_assets.sh | tail -n 1)"
fi
export AUTOQUANT_ASSETS
echo "assets: ${AUTOQUANT_ASSETS:-none}" >&2
AUTOQUANT_SKIP_LOG="$(mktemp)"
export AUTOQUANT_SKIP_LOG
trap 'rm -f "$AUTOQUANT_SKIP_LOG"' EXIT
status=0
cargo test --release --no-fail-fast "$@" || status=$?
skipped="$(sort -u "$AUTOQUANT_SKIP_LOG" | grep -c . || true)"
if [ "$skipped" -gt 0 ]; then
  echo "test.sh: $skipped test(s) SKIPPED for missing assets:" >&2
  sort -u "$AUTOQUANT_SKIP_LOG" | sed 's/^/  /' >&2
else
  echo "test.sh: no test skipped" >&2
fi
exit $status
