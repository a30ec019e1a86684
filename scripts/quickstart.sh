#!/usr/bin/env bash
# Set up, then prune the bundled SmolLM2-135M with SparseGPT 50% and print PPL before/after.
# The summary ends with the command for the per-layer table (llmprune report DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export LLMPRUNE_DATA_DIR="${LLMPRUNE_DATA_DIR:-../shared/data}"
.venv/bin/llmprune prune smollm2-135m --method sparsegpt --sparsity 0.5 \
    --nsamples 32 --seqlen 1024 --ppl wikitext2 --max-windows 40 \
    --out runs/smollm2-135m-sparsegpt-50 --overwrite "$@"
