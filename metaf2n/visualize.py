"""PNGs of a training run: sample grids and the loss curve."""

from __future__ import annotations

import io
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from metaf2n.io import atomic_write_bytes

GAP = 4


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3 or 1, H, W) float in [0, 1] -> (H, W, 3) uint8."""
    image = image.detach().float().cpu().clamp(0, 1)
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    return (image.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def _fit(image: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(image[None].float(), size=(size, size), mode="nearest")[0]


def sample_grid(
    lr: torch.Tensor,
    sr_before: torch.Tensor,
    sr_after: torch.Tensor,
    hr: torch.Tensor,
    face_lr: torch.Tensor,
    face_pseudo: torch.Tensor,
    weights: torch.Tensor,
) -> np.ndarray:
    """Top row: background LR (nearest x4) | SR before adaptation | SR after | HR. Bottom row: face LR | pseudo
    label | MaskNet's W (grey, W / max(1, max W)), scaled to the background size. All (C, H, W) in [0, 1]."""
    size = hr.shape[-1]
    w = weights / max(1.0, float(weights.max()))
    top = [_fit(lr, size), sr_before, sr_after, hr]
    bottom = [_fit(face_lr, size), _fit(face_pseudo, size), _fit(w, size)]
    width = 4 * size + 3 * GAP
    canvas = np.full((2 * size + GAP, width, 3), 255, dtype=np.uint8)
    for row, images in enumerate((top, bottom)):
        for col, image in enumerate(images):
            y, x = row * (size + GAP), col * (size + GAP)
            canvas[y : y + size, x : x + size] = _to_uint8(image)
    return canvas


def save_png(path: str | os.PathLike, rgb: np.ndarray) -> None:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def save_loss_curve(path: str | os.PathLike, records: list[dict]) -> None:
    """Training terms per meta-step (left) and the validation background PSNR before/after adaptation (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("phase") == "meta" and not r.get("skipped")]
    warmup = [r for r in records if r.get("phase") == "warmup"]
    val = [r for r in records if r.get("phase") == "val"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    if warmup:
        ax.plot([r["warmup_step"] - len(warmup) for r in warmup], [r["l1"] for r in warmup], color="0.6",
                label="warm-up L1 (steps < 0)")
    for key in ("total", "l1", "lpips", "gan", "ssl", "inner"):
        values = [r[key] for r in train if key in r]
        if any(v != 0 for v in values):
            ax.plot([r["step"] for r in train], values, label=key)
    ax.set_xlabel("meta-step")
    ax.set_yscale("log")
    ax.set_title("training losses")
    ax.legend(fontsize=8)
    ax = axes[1]
    if val:
        warmup_total = max([r.get("warmup_step", 0) for r in val] + [0])
        steps = [r["step"] if r["step"] > 0 else r.get("warmup_step", 0) - warmup_total for r in val]
        ax.plot(steps, [r["val_psnr_before"] for r in val], "o-", label="before adaptation")
        ax.plot(steps, [r["val_psnr_after"] for r in val], "s-", label="after adaptation")
        ax.legend(fontsize=8)
    ax.set_xlabel("meta-step (warm-up < 0)")
    ax.set_ylabel("background PSNR (dB)")
    ax.set_title("validation")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
