"""``python -m metaf2n.evaluate --results DIR --gt DIR --out DIR``: PSNR-Y, SSIM-Y and LPIPS of SR results.

Files are paired by stem (``results/NAME.*`` with ``gt/NAME.*``). A result without its ground truth, a ground truth
without its result, or a pair of different sizes is listed in ``summary.md`` and on stderr (exit status 1), never
skipped silently. Writes ``OUT/metrics.csv`` (``image,psnr_y,ssim_y,lpips``), ``OUT/summary.md`` (the means) and,
with ``--strips``, ``OUT/strips/NAME.png`` (result | ground truth).
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from metaf2n.data.images import list_images, read_image
from metaf2n.io import atomic_write_bytes, atomic_write_text
from metaf2n.metrics import psnr_y, ssim_y
from metaf2n.visualize import save_png

logger = logging.getLogger("metaf2n.evaluate")
COLUMNS = ("image", "psnr_y", "ssim_y", "lpips")


def pair_files(results: Path, gt: Path) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    """``(stem, result, gt)`` pairs and the problems (stems on one side only, duplicate stems)."""
    problems = []

    def by_stem(folder: Path, side: str) -> dict[str, Path]:
        files: dict[str, Path] = {}
        for path in list_images(folder):
            if path.stem in files:
                problems.append(f"{side}: two files named {path.stem}.*: {files[path.stem].name}, {path.name}")
            files.setdefault(path.stem, path)
        return files

    ours, theirs = by_stem(results, "results"), by_stem(gt, "gt")
    for stem in sorted(set(ours) - set(theirs)):
        problems.append(f"{ours[stem].name}: no ground truth named {stem}.* in {gt}")
    for stem in sorted(set(theirs) - set(ours)):
        problems.append(f"{theirs[stem].name}: no result named {stem}.* in {results}")
    return [(stem, ours[stem], theirs[stem]) for stem in sorted(set(ours) & set(theirs))], problems


def evaluate_pairs(pairs, crop_border: int, perceptual, strips: Path | None, device, quiet: bool):
    rows, problems = [], []
    for stem, result_path, gt_path in tqdm(pairs, desc="evaluating", unit="image", disable=quiet):
        result, gt = read_image(result_path), read_image(gt_path)
        if result.shape != gt.shape:
            problems.append(f"{result_path.name}: {result.shape[2]}x{result.shape[1]} but its ground truth "
                            f"{gt_path.name} is {gt.shape[2]}x{gt.shape[1]}")
            continue
        row = {"image": stem, "psnr_y": psnr_y(result, gt, crop_border), "ssim_y": ssim_y(result, gt, crop_border)}
        if perceptual is not None:
            with torch.no_grad():
                row["lpips"] = float(perceptual(result[None].to(device), gt[None].to(device)))
        else:
            row["lpips"] = math.nan
        rows.append(row)
        if strips is not None:
            strip = torch.cat([result, torch.ones(3, result.shape[1], 8), gt], dim=2)
            save_png(strips / f"{stem}.png", (strip.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8))
    return rows, problems


def write_outputs(out: Path, rows: list[dict], problems: list[str], crop_border: int) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (row[k] if k == "image" else f"{row[k]:.6f}") for k in COLUMNS})
    atomic_write_bytes(out / "metrics.csv", buffer.getvalue().encode())
    means = {k: float(np.mean([r[k] for r in rows])) if rows else math.nan for k in COLUMNS[1:]}
    lines = [f"# Evaluation ({len(rows)} images, Y channel of BT.601, crop border {crop_border})", "",
             "| metric | mean |", "|---|---|",
             f"| PSNR-Y (dB) | {means['psnr_y']:.3f} |", f"| SSIM-Y | {means['ssim_y']:.4f} |",
             f"| LPIPS (AlexNet) | {means['lpips']:.4f} |", ""]
    if problems:
        lines += [f"## {len(problems)} problem(s)", ""] + [f"- {p}" for p in problems] + [""]
    text = "\n".join(lines)
    atomic_write_text(out / "summary.md", text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m metaf2n.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", required=True, help="folder of SR results")
    parser.add_argument("--gt", required=True, help="folder of ground-truth images")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--crop-border", type=int, default=4, help="pixels removed from each side (default 4)")
    parser.add_argument("--no-lpips", action="store_true", help="skip LPIPS (no AlexNet weights needed)")
    parser.add_argument("--lpips-weights", help="AlexNet weights for LPIPS (default: see metaf2n.losses)")
    parser.add_argument("--strips", action="store_true", help="write result | ground-truth PNG strips")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    for name in ("results", "gt"):
        if not Path(getattr(args, name)).is_dir():
            parser.error(f"--{name} {getattr(args, name)!r} is not a folder")
    if args.crop_border < 0:
        parser.error(f"--crop-border must be >= 0, got {args.crop_border}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    perceptual = None
    if not args.no_lpips:
        from metaf2n.losses import lpips_alex

        try:
            perceptual = lpips_alex(args.lpips_weights, args.device)
        except FileNotFoundError as error:
            parser.error(f"{error} (or pass --no-lpips)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pairs, problems = pair_files(Path(args.results), Path(args.gt))
    rows, more = evaluate_pairs(pairs, args.crop_border, perceptual, out / "strips" if args.strips else None,
                                args.device, args.quiet)
    problems += more
    print(write_outputs(out, rows, problems, args.crop_border))
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    return 1 if problems or not rows else 0


if __name__ == "__main__":
    raise SystemExit(main())
