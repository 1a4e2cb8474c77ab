#!/usr/bin/env bash
# Stop `quantize` (RTN, GPTQ) and `convert --overwrite` with kill -9 and SIGTERM at many random
# moments (default 50 per command; the test suite runs 8) and check each time that the output
# is the complete old or new version and that `--resume` finishes with the uninterrupted bytes.
# Usage: scripts/kill_trials.sh [TRIALS]
set -euo pipefail
cd "$(dirname "$0")/.."
AUTOQUANT_KILL_TRIALS="${1:-50}" cargo test --release --test interrupted -- --nocapture --test-threads 1
