"""Image-quality metrics as SR papers report them (BasicSR's conventions).

* :func:`psnr_y`: PSNR on the Y channel of ITU-R BT.601 studio-swing YCbCr, ``Y = 16 + 65.481 R + 128.553 G +
  24.966 B`` for RGB in [0, 1] (so Y is on the 0..255 scale), ``crop_border`` pixels removed from every side,
  computed in float64 from 8-bit images;
* :func:`ssim_y`: SSIM on the same Y with an 11x11 Gaussian window (sigma 1.5), valid filtering only,
  ``C1 = (0.01 * 255)^2``, ``C2 = (0.03 * 255)^2`` (BasicSR / MATLAB);
* LPIPS: :func:`metaf2n.losses.lpips_alex`.

Images are (3, H, W) float tensors in [0, 1]; they are rounded to 8 bits first, as files are.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Y_WEIGHTS = (65.481, 128.553, 24.966)
Y_OFFSET = 16.0


def _check_pair(result: torch.Tensor, gt: torch.Tensor) -> None:
    for name, x in (("result", result), ("gt", gt)):
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[0] != 3:
            raise ValueError(f"{name} must be a (3, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if result.shape != gt.shape:
        raise ValueError(f"result and gt must have the same size, got {tuple(result.shape)} and {tuple(gt.shape)}")


def to_y(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) RGB in [0, 1] -> (H, W) float64 BT.601 luma on the 0..255 scale, from the 8-bit image."""
    rgb = (image.double().clamp(0, 1) * 255).round() / 255
    wr, wg, wb = Y_WEIGHTS
    return Y_OFFSET + wr * rgb[0] + wg * rgb[1] + wb * rgb[2]


def _crop(y: torch.Tensor, border: int) -> torch.Tensor:
    if border < 0:
        raise ValueError(f"crop_border must be >= 0, got {border}")
    if border == 0:
        return y
    if min(y.shape) <= 2 * border:
        raise ValueError(f"image of {tuple(y.shape)} is too small for crop_border {border}")
    return y[border:-border, border:-border]


def psnr_y(result: torch.Tensor, gt: torch.Tensor, crop_border: int = 4) -> float:
    """PSNR (dB) on Y; ``inf`` for identical images."""
    _check_pair(result, gt)
    mse = float(((_crop(to_y(result), crop_border) - _crop(to_y(gt), crop_border)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g /= g.sum()
    return torch.outer(g, g)


def ssim_y(result: torch.Tensor, gt: torch.Tensor, crop_border: int = 4) -> float:
    """SSIM on Y (mean over the valid 11x11-window positions)."""
    _check_pair(result, gt)
    x = _crop(to_y(result), crop_border)[None, None]
    y = _crop(to_y(gt), crop_border)[None, None]
    if min(x.shape[-2:]) < 11:
        raise ValueError(f"SSIM needs at least 11x11 pixels after cropping, got {tuple(x.shape[-2:])}")
    window = _gaussian_window()[None, None]
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean())
