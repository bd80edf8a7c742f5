#!/usr/bin/env bash
# Set up, then run the test suite (slow tests too with: bash scripts/test.sh -m "slow or not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q "$@"
