#!/usr/bin/env bash
# Sets everything up, then runs the main job: the embedded benchmark (aligned SmolLM2-135M-Instruct,
# Medical -> Legal -> Code) with Standard LoRA and SafeAnchor side by side. Rerunning resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# the two methods run side by side, one process and one CPU thread each (JOBS=1: one after the other)
exec .venv/bin/safeanchor run --preset quickstart --method "${METHODS:-standard,safeanchor}" --jobs "${JOBS:-2}" \
  --out "${OUT:-runs/quickstart}" "$@"
