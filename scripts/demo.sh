#!/usr/bin/env bash
# The main job on the embedded demo data: set up, meta-train the demo preset (runs/demo: checkpoints, log.jsonl,
# TensorBoard, sample PNGs, loss_curve.png), make a small synthetic test set, adapt + super-resolve it with the demo
# checkpoint and evaluate it (results/demo_infer, results/demo_eval), then the SSL demo (results/demo).
# Running it again resumes runs/demo (a finished run just rewrites its loss curve) and remakes the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
py=.venv/bin/python
resume=()
[ -f runs/demo/checkpoints/latest.pt ] && resume=(--resume)
$py -m metaf2n.train --preset demo --out runs/demo "${resume[@]}" "$@"
rm -rf results/demo_testset results/demo_infer results/demo_eval
$py -m metaf2n.data.make_testset -o results/demo_testset --mode iid --count 4 --seed 0
$py -m metaf2n.infer results/demo_testset/LQ -o results/demo_infer --checkpoint runs/demo/checkpoints/latest.pt \
  --face-lq results/demo_testset/Face_LQ --face-hq results/demo_testset/Face_HQ
$py -m metaf2n.evaluate --results results/demo_infer --gt results/demo_testset/GT --out results/demo_eval --strips
$py -m metaf2n.demo --out results/demo
