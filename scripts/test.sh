#!/usr/bin/env bash
# Set up (idempotent), lint, and run the whole test suite: every marker CI needs (slow: the real
# model, multiprocess: two gloo processes; gpu tests skip themselves without CUDA), the 25 slowest shown.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export LLMPRUNE_DATA_DIR="${LLMPRUNE_DATA_DIR:-../shared/data}"
.venv/bin/ruff check src tests bench
.venv/bin/python -m pytest -q --durations=25 "$@"
