"""TensorFlow 1's ``tf.image.resize_bicubic(images, size)`` with its defaults (``align_corners=False``,
``half_pixel_centers=False``), in PyTorch.

The official MetaF2N feeds its MaskNet this resize of the LQ face, so a converted MetaF2N checkpoint's MaskNet must
see it too. Its rules, from TensorFlow's ``resize_bicubic_op``:

* output pixel ``o`` samples the input at ``x = o * (in / out)`` (a float32 product; no half-pixel shift), with
  ``i = floor(x)`` and ``t = x - i``;
* the four taps ``i - 1 .. i + 2`` are clamped into ``[0, in - 1]`` (edge replication), with no renormalisation;
* their weights come from a table of the cubic kernel with ``a = -0.75`` sampled at 1025 points,
  ``t`` rounded to the nearest 1/1024 (``lrintf``): ``W(1 + t), W(t), W(1 - t), W(2 - t)``;
* the result is not clamped.

Each row is resized along the width first, then the columns along the height, in float32, as TensorFlow does.
"""

from __future__ import annotations

import numpy as np
import torch

TABLE_SIZE = 1024
A = -0.75


def coefficient_table(a: float = A) -> np.ndarray:
    """(TABLE_SIZE + 1, 2) float32: ``[k, 0] = W(k / TABLE_SIZE)``, ``[k, 1] = W(1 + k / TABLE_SIZE)``."""
    x = np.arange(TABLE_SIZE + 1, dtype=np.float32) / np.float32(TABLE_SIZE)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far_x = x + np.float32(1)
    far = ((a * far_x - 5 * a) * far_x + 8 * a) * far_x - 4 * a
    return np.stack([near, far], axis=1).astype(np.float32)


def interpolation_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """(out_size, in_size) float32 matrix M with ``resized = M @ signal`` along one axis."""
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be >= 1, got {in_size} -> {out_size}")
    table = coefficient_table()
    scale = np.float32(in_size) / np.float32(out_size)
    matrix = np.zeros((out_size, in_size), np.float32)
    for o in range(out_size):
        x = np.float32(o) * scale
        i = int(np.floor(x))
        offset = int(np.rint(np.float32(x - np.float32(i)) * np.float32(TABLE_SIZE)))
        weights = (table[offset, 1], table[offset, 0], table[TABLE_SIZE - offset, 0], table[TABLE_SIZE - offset, 1])
        for tap, weight in zip(range(i - 1, i + 3), weights):
            matrix[o, min(max(tap, 0), in_size - 1)] += weight
    return torch.from_numpy(matrix)


def resize_bicubic_tf1(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``images`` (B, C, H, W) resized to ``size`` (h, w) as TF1's ``resize_bicubic`` does; differentiable."""
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got {tuple(images.shape)}")
    height, width = images.shape[-2:]
    rows = interpolation_matrix(height, size[0]).to(images.device, images.dtype)
    cols = interpolation_matrix(width, size[1]).to(images.device, images.dtype)
    return rows @ (images @ cols.T)
