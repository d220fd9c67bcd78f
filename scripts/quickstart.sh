#!/usr/bin/env bash
# Sets everything up, then runs the main job: the embedded benchmark (aligned SmolLM2-135M-Instruct,
# Medical -> Legal -> Code) with Standard LoRA, then SafeAnchor, and prints them side by side.
# Rerunning resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# One method after the other, each with every core (Standard LoRA's table first, then SafeAnchor's, then
# the comparison; on a 2-core Zen 4 SafeAnchor's work took 2.0x Standard's, see the README).
# JOBS=2 runs the two at once instead (one thread each).
exec .venv/bin/safeanchor run --preset quickstart --method "${METHODS:-standard,safeanchor}" --jobs "${JOBS:-1}" \
  --out "${OUT:-runs/quickstart}" "$@"
