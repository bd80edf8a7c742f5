"""Write one PNG showing a sampled MetaF2N task: HR, LR (nearest x4) and target per patch.

Usage: python scripts/degradation_gallery.py --out results/gallery.png --seed 0
Faces come first (GT | LR | pseudo-HQ label), then backgrounds (HR | LR | HR + USM).
Without --faces/--backgrounds the embedded demo set is used (built on first use).
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from metaf2n.data import TaskConfig, TaskSampler

TILE = 256
LABEL_HEIGHT = 22
FACE_COLUMNS = ("face GT", "face LR (nearest x4)", "face pseudo-HQ")
BACKGROUND_COLUMNS = ("background HR", "background LR (nearest x4)", "background HR + USM")


def to_tile(image: torch.Tensor) -> Image.Image:
    """(3, h, w) in [0, 1] -> TILE x TILE PIL image, nearest-neighbour so pixels stay visible."""
    tile = F.interpolate(image[None], size=(TILE, TILE), mode="nearest")[0]
    array = (tile.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def draw_section(canvas: Image.Image, top: int, titles, rows, font) -> int:
    """Paste column titles and rows of tiles starting at ``top``; returns the next free y."""
    draw = ImageDraw.Draw(canvas)
    for column, title in enumerate(titles):
        draw.text((column * TILE + 6, top + 4), title, fill="white", font=font)
    top += LABEL_HEIGHT
    for row in rows:
        for column, image in enumerate(row):
            canvas.paste(to_tile(image), (column * TILE, top))
        top += TILE
    return top


def build_gallery(sampler: TaskSampler, seed: int) -> Image.Image:
    batch = sampler.sample(1, torch.Generator().manual_seed(seed))
    face_rows = list(zip(batch.face_gt[0], batch.face_lr[0], batch.face_pseudo[0]))
    background_rows = list(zip(batch.bg_hr[0], batch.bg_lr[0], batch.bg_hr_usm[0]))

    font = ImageFont.load_default(size=14)
    caption = textwrap.wrap(f"seed {seed}: " + batch.degradations[0].describe(), width=100)
    header = 8 + 18 * len(caption)
    height = header + 2 * LABEL_HEIGHT + TILE * (len(face_rows) + len(background_rows))
    canvas = Image.new("RGB", (3 * TILE, height), "black")
    ImageDraw.Draw(canvas).multiline_text((6, 4), "\n".join(caption), fill="yellow", font=font, spacing=4)
    top = draw_section(canvas, header, FACE_COLUMNS, face_rows, font)
    draw_section(canvas, top, BACKGROUND_COLUMNS, background_rows, font)
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/gallery.png"), help="PNG file to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampled task")
    parser.add_argument("--patches", type=int, default=2, help="face and background patches to show")
    parser.add_argument("--faces", type=Path, default=None, help="folder of aligned faces (default: demo set)")
    parser.add_argument("--backgrounds", type=Path, default=None, help="folder of backgrounds (default: demo set)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="demo set cache directory")
    args = parser.parse_args()
    if args.patches < 1:
        parser.error("--patches must be >= 1")

    config = TaskConfig(face_patches=args.patches, background_patches=args.patches)
    sampler = TaskSampler(args.faces, args.backgrounds, config=config, demo_cache_dir=args.cache_dir)
    gallery = build_gallery(sampler, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    gallery.save(args.out)
    print(f"wrote {args.out} ({gallery.width}x{gallery.height})")


if __name__ == "__main__":
    main()
