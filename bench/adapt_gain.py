"""The adaptation-gain experiment: how much one (or five) face-guided inner steps improve whole-photo SR.

    python bench/adapt_gain.py --checkpoint runs/demo/checkpoints/latest.pt           # synthetic iid + ood sets
    python bench/adapt_gain.py --checkpoint ckpt.pt --testset FFHQ_iid --out results/adapt_gain

For each test set (made with :mod:`metaf2n.data.make_testset` from the embedded demo data unless ``--testset`` is
given), every LQ photo is super-resolved by (a) bicubic x4, (b) the un-adapted model and (c) the model adapted on the
photo's faces (``Face_LQ``/``Face_HQ``) with 1 and with 5 inner steps, all tiled as ``metaf2n.infer`` does; PSNR-Y,
SSIM-Y and LPIPS are averaged over the photos. Prints a table, writes ``adapt_gain.md`` and ``adapt_gain.png`` (one
example: LQ | un-adapted | adapted | GT, the face box drawn in red).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from metaf2n.data.images import read_image
from metaf2n.data.make_testset import make_testset
from metaf2n.inference import adapt_to_faces, faces_from_files, load_model, sample_face_patches, tiled_super_resolve
from metaf2n.infer import face_files
from metaf2n.losses import lpips_alex
from metaf2n.metrics import psnr_y, ssim_y

METHODS = ("bicubic", "un-adapted", "adapted, 1 step", "adapted, 5 steps")


def super_resolve_all(model, lq: torch.Tensor, pairs, seed: int, patches: int, tile: int, overlap: int) -> dict:
    out = {"bicubic": F.interpolate(lq[None], scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)[0]}
    out["un-adapted"] = tiled_super_resolve(model.sr, lq[None], None, tile, overlap)[0]
    inner = {}
    for steps in (1, 5):
        lr_groups, hq_groups = sample_face_patches(pairs, patches, torch.Generator().manual_seed(seed))
        adaptation = adapt_to_faces(model, lr_groups, hq_groups, steps)
        out[f"adapted, {steps} step{'s' if steps > 1 else ''}"] = tiled_super_resolve(
            model.sr, lq[None], adaptation.params, tile, overlap)[0]
        inner[steps] = (adaptation.inner_before, adaptation.inner_after)
    return out, inner


def evaluate_set(model, testset: Path, perceptual, args) -> tuple[dict, dict]:
    sums = {m: {"psnr_y": 0.0, "ssim_y": 0.0, "lpips": 0.0} for m in METHODS}
    inner_sums = {1: [0.0, 0.0], 5: [0.0, 0.0]}
    names = sorted(p.stem for p in (testset / "LQ").iterdir())
    example = None
    for index, name in enumerate(names):
        lq, gt = read_image(testset / "LQ" / f"{name}.png"), read_image(testset / "GT" / f"{name}.png")
        pairs = faces_from_files(face_files(testset / "Face_LQ", name), face_files(testset / "Face_HQ", name),
                                 read_image)
        outputs, inner = super_resolve_all(model, lq, pairs, args.seed + index, args.patches, args.tile,
                                           args.tile_overlap)
        for method, image in outputs.items():
            sums[method]["psnr_y"] += psnr_y(image, gt)
            sums[method]["ssim_y"] += ssim_y(image, gt)
            with torch.no_grad():
                sums[method]["lpips"] += float(perceptual(image[None], gt[None]))
        for steps, (before, after) in inner.items():
            inner_sums[steps][0] += before
            inner_sums[steps][1] += after
        if example is None:
            example = (name, lq, outputs["un-adapted"], outputs["adapted, 1 step"], gt)
    n = len(names)
    means = {m: {k: v / n for k, v in values.items()} for m, values in sums.items()}
    means["_inner"] = {steps: (b / n, a / n) for steps, (b, a) in inner_sums.items()}
    return means, {"example": example, "count": n}


def example_png(path: Path, example, boxes: dict) -> None:
    name, lq, unadapted, adapted, gt = example
    size = gt.shape[-1]
    up = F.interpolate(lq[None], size=gt.shape[-2:], mode="nearest")[0]
    panels = [up, unadapted, adapted, gt]
    canvas = Image.new("RGB", (4 * size + 3 * 6, gt.shape[-2]), "white")
    for i, panel in enumerate(panels):
        tile = Image.fromarray((panel.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8))
        draw = ImageDraw.Draw(tile)
        for top, left, side in boxes.get(name, []):
            draw.rectangle([4 * left, 4 * top, 4 * (left + side) - 1, 4 * (top + side) - 1], outline=(255, 0, 0),
                           width=2)
        canvas.paste(tile, (i * (size + 6), 0))
    canvas.save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--testset", nargs="*", help="test-set folders (default: synthetic iid and ood sets)")
    parser.add_argument("--count", type=int, default=8, help="photos per synthetic set")
    parser.add_argument("--patches", type=int, default=16)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--tile-overlap", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/adapt_gain")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    model = load_model(args.checkpoint)
    perceptual = lpips_alex()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="adapt-gain-") as temp:
        sets = [Path(p) for p in args.testset] if args.testset else [
            make_testset(Path(temp) / mode, mode, args.count, args.seed, progress=False) for mode in ("iid", "ood")]
        lines = [f"Checkpoint `{args.checkpoint}` ({model.source}, inner lr {model.inner_lr:g}), "
                 f"{args.patches} face patches, tile {args.tile}/{args.tile_overlap}.", "",
                 "| test set | method | PSNR-Y (dB) | SSIM-Y | LPIPS |", "|---|---|---|---|---|"]
        inner_lines = []
        example_written = False
        for testset in sets:
            means, info = evaluate_set(model, testset, perceptual, args)
            label = f"{testset.name} ({info['count']})"
            for method in METHODS:
                m = means[method]
                lines.append(f"| {label} | {method} | {m['psnr_y']:.2f} | {m['ssim_y']:.4f} | {m['lpips']:.4f} |")
            for steps, (before, after) in means["_inner"].items():
                inner_lines.append(f"- {label}: face-patch inner loss {before:.4f} -> {after:.4f} after {steps} "
                                   f"step{'s' if steps > 1 else ''}")
            if not example_written:
                boxes_file = testset / "faces.json"
                boxes = json.loads(boxes_file.read_text()) if boxes_file.is_file() else {}
                example_png(out / "adapt_gain.png", info["example"], boxes)
                example_written = True
    text = "\n".join(lines + [""] + inner_lines) + "\n"
    print(text)
    (out / "adapt_gain.md").write_text(text)
    print(f"example: {out / 'adapt_gain.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
