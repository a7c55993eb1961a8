#!/usr/bin/env bash
# README command 2: set up, lint, and run the test suite (about 10-15 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks
.venv/bin/python -m pytest -q -n 2 --durations=15 "$@"
