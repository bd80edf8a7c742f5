#!/usr/bin/env bash
# The main job on the embedded demo data: set up, meta-train the demo preset (runs/demo: checkpoints, log.jsonl,
# TensorBoard, sample PNGs, loss_curve.png), then the SSL demo on one demo task (PNGs in results/demo).
# Running it again resumes runs/demo (a finished run just rewrites its loss curve).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
resume=()
[ -f runs/demo/checkpoints/latest.pt ] && resume=(--resume)
.venv/bin/python -m metaf2n.train --preset demo --out runs/demo "${resume[@]}" "$@"
.venv/bin/python -m metaf2n.demo --out results/demo
