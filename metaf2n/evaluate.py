"""``python -m metaf2n.evaluate --results [LABEL=]DIR ... --gt DIR --out DIR``: PSNR-Y, SSIM-Y and LPIPS of SR results.

``--results`` may be given several times (one method each, labelled by ``LABEL=`` or the folder's name), and
``--bicubic LQ_DIR`` adds the bicubic x4 upsampling of the LQ photos as a method of its own. Files are paired by stem
(``results/NAME.*`` with ``gt/NAME.*``). A result without its ground truth, a ground truth without its result, or a
pair of different sizes is listed in ``summary.md`` and on stderr (exit status 1), never skipped silently. Writes
``OUT/metrics.csv`` (``method,image,psnr_y,ssim_y,lpips``), ``OUT/summary.md`` (each method's means, one table) and,
with ``--strips``, ``OUT/strips/NAME.png`` (each method, then the ground truth, labelled).
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
from PIL import Image
from tqdm import tqdm

from metaf2n.data.images import list_images, read_image, uint8_to_tensor
from metaf2n.io import atomic_write_bytes, atomic_write_text
from metaf2n.metrics import psnr_y, ssim_y
from metaf2n.visualize import save_png

logger = logging.getLogger("metaf2n.evaluate")
COLUMNS = ("method", "image", "psnr_y", "ssim_y", "lpips")
SSIM_WINDOW = 11
METRICS = COLUMNS[2:]
GAP = 8
LABEL_HEIGHT = 14


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


def bicubic_results(lq_dir: Path, out: Path) -> Path:
    """The bicubic x4 upsampling (torch, a = -0.75, clamped, 8-bit) of every image in ``lq_dir``, as PNGs in
    ``out``."""
    import torch.nn.functional as F

    out.mkdir(parents=True, exist_ok=True)
    for path in list_images(lq_dir):
        up = F.interpolate(read_image(path)[None], scale_factor=4, mode="bicubic", align_corners=False)[0]
        save_png(out / f"{path.stem}.png", (up.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8))
    return out


def labelled(image: torch.Tensor, label: str) -> torch.Tensor:
    """``image`` (3, H, W) with a white band above it holding ``label`` in black."""
    from PIL import Image, ImageDraw

    band = Image.new("RGB", (image.shape[2], LABEL_HEIGHT), "white")
    ImageDraw.Draw(band).text((2, 1), label.replace(" ", "  "), fill="black")  # the default font's space is thin
    return torch.cat([uint8_to_tensor(np.asarray(band)), image], dim=1)


def evaluate_methods(methods: dict[str, Path], gt_dir: Path, crop_border: int, perceptual,
                     strips: Path | None, device, quiet: bool) -> tuple[list[dict], list[str]]:
    """One row per (method, image) pair; a strip per ground-truth image (each method's result, then the GT)."""
    rows, problems, panels = [], [], {}
    for label, folder in methods.items():
        pairs, found = pair_files(folder, gt_dir)
        problems += [f"{label}: {p}" for p in found] if len(methods) > 1 else found
        for stem, result_path, gt_path in tqdm(pairs, desc=f"evaluating {label}", unit="image", disable=quiet):
            try:
                result, gt = read_image(result_path), read_image(gt_path)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
                problems.append(f"{result_path.name} / {gt_path.name}: cannot be read as an image ({error})")
                continue
            if min(gt.shape[1:]) - 2 * crop_border < SSIM_WINDOW:
                problems.append(f"{gt_path.name}: {gt.shape[2]}x{gt.shape[1]} is too small for SSIM's "
                                f"{SSIM_WINDOW}x{SSIM_WINDOW} window after a crop border of {crop_border}")
                continue
            if result.shape != gt.shape:
                problems.append(f"{result_path.name}: {result.shape[2]}x{result.shape[1]} but its ground truth "
                                f"{gt_path.name} is {gt.shape[2]}x{gt.shape[1]}")
                continue
            row = {"method": label, "image": stem, "psnr_y": psnr_y(result, gt, crop_border),
                   "ssim_y": ssim_y(result, gt, crop_border), "lpips": math.nan}
            if perceptual is not None:
                with torch.no_grad():
                    row["lpips"] = float(perceptual(result[None].to(device), gt[None].to(device)))
            rows.append(row)
            if strips is not None:
                panels.setdefault(stem, [("ground truth", gt)]).insert(-1, (label, result))
    for stem, images in panels.items():
        gap = torch.ones(3, images[0][1].shape[1] + LABEL_HEIGHT, GAP)
        pieces = [piece for label, image in images for piece in (labelled(image, label), gap)][:-1]
        strip = torch.cat(pieces, dim=2)
        save_png(strips / f"{stem}.png", (strip.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8))
    return rows, problems


def mean_table(rows: list[dict], methods) -> list[str]:
    """Markdown rows ``| method | PSNR-Y | SSIM-Y | LPIPS | images |`` of each method's means."""
    lines = ["| method | PSNR-Y (dB) | SSIM-Y | LPIPS (AlexNet) | images |", "|---|---|---|---|---|"]
    for label in methods:
        mine = [r for r in rows if r["method"] == label]
        means = {k: float(np.mean([r[k] for r in mine])) if mine else math.nan for k in METRICS}
        lines.append(f"| {label} | {means['psnr_y']:.3f} | {means['ssim_y']:.4f} | {means['lpips']:.4f} | "
                     f"{len(mine)} |")
    return lines


def write_outputs(out: Path, rows: list[dict], problems: list[str], crop_border: int, methods,
                  notes: list[str] = ()) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (row[k] if k in ("method", "image") else f"{row[k]:.6f}") for k in COLUMNS})
    atomic_write_bytes(out / "metrics.csv", buffer.getvalue().encode())
    images = len({r["image"] for r in rows})
    lines = [f"# Evaluation ({images} images, Y channel of BT.601, crop border {crop_border})", "",
             *mean_table(rows, methods), ""]
    lines += [f"{note}" for note in notes] + ([""] if notes else [])
    if problems:
        lines += [f"## {len(problems)} problem(s)", ""] + [f"- {p}" for p in problems] + [""]
    text = "\n".join(lines)
    atomic_write_text(out / "summary.md", text)
    return text


def parse_methods(items: list[str]) -> dict[str, Path]:
    """``LABEL=DIR`` or ``DIR`` (labelled by the folder's name) -> {label: folder}; labels must differ."""
    methods: dict[str, Path] = {}
    for item in items:
        label, sep, folder = item.partition("=")
        if not sep:
            label, folder = Path(item).name or item, item
        if not label or not folder:
            raise ValueError(f"--results must be DIR or LABEL=DIR, got {item!r}")
        if label in methods:
            raise ValueError(f"--results: two methods labelled {label!r}")
        if not Path(folder).is_dir():
            raise ValueError(f"--results {folder!r} is not a folder")
        methods[label] = Path(folder)
    return methods


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m metaf2n.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", action="append", default=[], metavar="[LABEL=]DIR",
                        help="folder of SR results; repeat for several methods")
    parser.add_argument("--bicubic", metavar="LQ_DIR", help="also evaluate the bicubic x4 upsampling of these photos")
    parser.add_argument("--gt", required=True, help="folder of ground-truth images")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--crop-border", type=int, default=4, help="pixels removed from each side (default 4)")
    parser.add_argument("--no-lpips", action="store_true", help="skip LPIPS (no AlexNet weights needed)")
    parser.add_argument("--lpips-weights", help="AlexNet weights for LPIPS (default: see metaf2n.losses)")
    parser.add_argument("--strips", action="store_true", help="write labelled strips: each method | ground truth")
    parser.add_argument("--note", action="append", default=[], help="a line written under the table (repeatable)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if not args.results and not args.bicubic:
        parser.error("give --results DIR (or --bicubic LQ_DIR)")
    try:
        methods = parse_methods(args.results)
    except ValueError as error:
        parser.error(str(error))
    for name in ("gt", "bicubic"):
        if getattr(args, name) is not None and not Path(getattr(args, name)).is_dir():
            parser.error(f"--{name} {getattr(args, name)!r} is not a folder")
    if args.crop_border < 0:
        parser.error(f"--crop-border must be >= 0, got {args.crop_border}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from metaf2n.trainer import resolve_device

    try:
        args.device = resolve_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    perceptual = None
    if not args.no_lpips:
        from metaf2n.losses import lpips_alex

        try:
            perceptual = lpips_alex(args.lpips_weights, args.device)
        except FileNotFoundError as error:
            parser.error(f"{error} (or pass --no-lpips)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.bicubic:
        if "bicubic" in methods:
            parser.error("--results: the label 'bicubic' is taken by --bicubic; give that method another label")
        methods = {"bicubic": bicubic_results(Path(args.bicubic), out / "bicubic"), **methods}
    rows, problems = evaluate_methods(methods, Path(args.gt), args.crop_border, perceptual,
                                      out / "strips" if args.strips else None, args.device, args.quiet)
    print(write_outputs(out, rows, problems, args.crop_border, methods, args.note))
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    return 1 if problems or not rows else 0


if __name__ == "__main__":
    raise SystemExit(main())
