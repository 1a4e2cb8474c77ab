#!/usr/bin/env bash
# The whole test suite: fetch the real model and text (cached, checksummed), then run every
# Rust test in release mode (numerics-heavy tests are slow unoptimized). No Python is needed
# at test time; golden fixtures are committed (see docs/golden.md to regenerate them).
set -euo pipefail
cd "$(dirname "$0")/.."
AUTOQUANT_REQUIRE_ASSETS=1
export AUTOQUANT_REQUIRE_ASSETS
AUTOQUANT_ASSETS="$(scripts/fetch_assets.sh | tail -n 1)"
export AUTOQUANT_ASSETS
echo "assets: $AUTOQUANT_ASSETS" >&2
cargo test --release "$@"
