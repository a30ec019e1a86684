#!/usr/bin/env bash
# Set up (idempotent), lint, and run the whole test suite (the real-model tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export LLMPRUNE_DATA_DIR="${LLMPRUNE_DATA_DIR:-../shared/data}"
.venv/bin/ruff check src tests bench
.venv/bin/python -m pytest -q "$@"
