#!/usr/bin/env bash
# The main job on the embedded demo data: set up, run the SSL demo on one demo task (PNGs in results/demo), then the
# CPU benchmark of our ops against the plain-PyTorch reference at 128^2 (table + PNG in results/bench).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m metaf2n.demo --out results/demo
.venv/bin/python bench/bench_ssl.py --sizes 128 --repeats 2 --out results/bench
