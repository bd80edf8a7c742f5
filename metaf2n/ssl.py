"""The self-similarity loss (SSL, Chen et al., ACM MM 2024): the public API.

Usable on its own with any SR model::

    from metaf2n.ssl import ssl_loss
    loss = pixel_loss + beta * ssl_loss(sr, hr)   # sr, hr: (B, C, H, W) in [0, 1]; gradient flows into sr only

Edge pixels of the HR image (:func:`edge_mask`) each get a row of patch similarities over a ``search`` x ``search``
window, ``S = softmax(-d2 / h)``; the loss compares the SR and HR rows with ``KL + L1``. The heavy lifting is done
by the compiled ``torch.ops.metaf2n`` operators (C++ on the CPU, CUDA on the GPU), see :mod:`metaf2n.ops`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import ops

__all__ = ["SelfSimilarityLoss", "edge_mask", "mask_positions", "self_similarity_graph", "ssl_loss"]

# ITU-R BT.601 luma as PIL's Image.convert("L") computes it, the grey image of the published mask generator:
# Y = (19595 R + 38470 G + 7471 B + 2^15) >> 16.
_LUMA_WEIGHTS = (19595, 38470, 7471)
_LUMA_SHIFT = 16
_LAPLACIAN = ((0, 1, 0), (1, -4, 1), (0, 1, 0))


def _check_image(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor with values in [0, 1], got {x.dtype}")


def _check_settings(**settings) -> None:
    """search and patch are ints (a bool is refused: ``search=True`` would silently mean a 1 x 1 window); h and the
    weights are numbers."""
    for name in ("search", "patch"):
        value = settings.get(name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
    for name in ("h", "kl_weight", "l1_weight"):
        value = settings.get(name)
        if name in settings and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise TypeError(f"{name} must be a number, got {value!r}")


def _check_range(x: torch.Tensor, name: str, upper: float) -> None:
    """Images in [0, 255] instead of [0, 1] make every patch distance huge and the loss silently 0: refuse them.
    (Skipped while torch.compile traces, where a data-dependent check would break the graph.)"""
    if torch.compiler.is_compiling() or x.numel() == 0:
        return
    high = float(x.detach().amax())
    if high > upper:
        raise ValueError(f"{name} must hold values in [0, 1], got a maximum of {high:.4g} (an 8-bit image? divide "
                         "it by 255)")


@torch.no_grad()
def edge_mask(hr: torch.Tensor, threshold: float = 20.0, stride: int = 1) -> torch.Tensor:
    """Edge pixels of ``hr`` as the published offline SSL mask computes them, bit for bit.

    ``hr`` (B, 3, H, W) or (B, 1, H, W) in [0, 1] is quantised to 8 bits, turned into luma with PIL's
    ``Image.convert("L")`` integer formula (grey images are used as they are), filtered with the 3x3 Laplacian
    [0,1,0; 1,-4,1; 0,1,0] with reflect-101 borders and saturated to [0, 255] like OpenCV's ``CV_8U`` output.
    Returns a bool (B, H, W) mask of responses ``> threshold``, keeping only pixels with ``(y - x) % stride == 0``.
    The published masks are computed on whole training images before cropping; called on a crop, the pixels on its
    border see reflected neighbours instead (``TaskBatch.bg_edges`` holds masks cut from the whole crop).
    """
    _check_image(hr, "hr")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold must be a number, got {type(threshold).__name__}")
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    if hr.shape[1] not in (1, 3):
        raise ValueError(f"hr must have 1 or 3 channels for the edge mask, got {hr.shape[1]}")
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive int, got {stride!r}")
    if hr.shape[2] < 2 or hr.shape[3] < 2:
        raise ValueError(f"hr must be at least 2x2 for the 3x3 Laplacian, got {tuple(hr.shape[2:])}")
    q = (hr.float().clamp(0, 1) * 255).round().to(torch.int32)
    if q.shape[1] == 3:
        wr, wg, wb = _LUMA_WEIGHTS
        luma = (wr * q[:, 0] + wg * q[:, 1] + wb * q[:, 2] + (1 << (_LUMA_SHIFT - 1))) >> _LUMA_SHIFT
    else:
        luma = q[:, 0]
    padded = F.pad(luma[:, None].float(), (1, 1, 1, 1), mode="reflect")
    kernel = torch.tensor(_LAPLACIAN, dtype=torch.float32, device=hr.device).view(1, 1, 3, 3)
    response = F.conv2d(padded, kernel)[:, 0].clamp(0, 255)
    mask = response > threshold
    if stride > 1:
        ys = torch.arange(hr.shape[2], device=hr.device)[:, None]
        xs = torch.arange(hr.shape[3], device=hr.device)[None, :]
        mask &= (ys - xs) % stride == 0
    return mask


def mask_positions(mask: torch.Tensor, image: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """``(N, 3)`` int64 positions ``(b, y, x)`` of a bool (B, H, W) mask matching ``image`` (B, C, H, W)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {mask.dtype}")
    expected = (image.shape[0], image.shape[2], image.shape[3])
    if tuple(mask.shape) != expected:
        raise ValueError(f"{name} must have shape (B, H, W) = {expected}, got {tuple(mask.shape)}")
    if mask.device != image.device:
        raise ValueError(f"{name} must be on the image's device {image.device}, got {mask.device}")
    return torch.nonzero(mask)


def self_similarity_graph(
    img: torch.Tensor,
    mask: torch.Tensor,
    search: int = 25,
    patch: int = 9,
    h: float = 0.004,
    padding: str = "image",
    path: str = "auto",
) -> torch.Tensor:
    """Self-similarity rows of ``img`` (B, C, H, W) at the True pixels of ``mask`` (B, H, W).

    Returns (N, search**2), rows in ``torch.nonzero(mask)`` order, each summing to 1. Differentiable w.r.t. img.
    """
    _check_image(img, "img")
    _check_settings(search=search, patch=patch, h=h)
    return ops.similarity_graph(img, mask_positions(mask, img), search, patch, h, padding, path)


def ssl_loss(
    sr: torch.Tensor,
    hr: torch.Tensor,
    mask: torch.Tensor | None = None,
    search: int = 25,
    patch: int = 9,
    h: float = 0.004,
    kl_weight: float = 1000.0,
    l1_weight: float = 1000.0,
    padding: str = "image",
    threshold: float = 20.0,
    stride: int = 1,
    path: str = "auto",
) -> torch.Tensor:
    """Self-similarity loss between ``sr`` and ``hr`` (B, C, H, W) in [0, 1]; a scalar.

    ``kl_weight * KL(S_hr || S_sr) + l1_weight * |S_sr - S_hr|``, both averaged over the N masked pixels and the K
    offsets. ``mask`` (B, H, W) bool selects the pixels; None means ``edge_mask(hr, threshold, stride)``. An empty
    mask gives 0 with a zero gradient. ``hr`` never receives a gradient. ``path`` picks the implementation,
    ``"direct"``, ``"dense"`` or ``"auto"``, see :func:`metaf2n.ops.similarity_graph`.
    """
    _check_image(sr, "sr")
    _check_image(hr, "hr")
    if hr.shape != sr.shape:
        raise ValueError(f"hr must have the shape of sr {tuple(sr.shape)}, got {tuple(hr.shape)}")
    _check_settings(search=search, patch=patch, h=h, kl_weight=kl_weight, l1_weight=l1_weight)
    # Only the ground truth: a network's output may lie anywhere (an untrained x4plus gives values near 10), and an SR
    # image in [0, 255] against an HR in [0, 1] gives a large loss, not a silent 0.
    _check_range(hr, "hr", 1.0 + 1e-3)
    if mask is None:
        mask = edge_mask(hr, threshold, stride)
    return ops.ssl_loss(
        sr, hr.detach(), mask_positions(mask, sr), search, patch, h, kl_weight, l1_weight, padding, path
    )


class SelfSimilarityLoss(nn.Module):
    """:func:`ssl_loss` as a module; ``forward(sr, hr, mask=None)``."""

    def __init__(
        self,
        search: int = 25,
        patch: int = 9,
        h: float = 0.004,
        kl_weight: float = 1000.0,
        l1_weight: float = 1000.0,
        padding: str = "image",
        threshold: float = 20.0,
        stride: int = 1,
        path: str = "auto",
    ) -> None:
        super().__init__()
        self.search, self.patch, self.h = search, patch, h
        self.kl_weight, self.l1_weight = kl_weight, l1_weight
        self.padding, self.threshold, self.stride, self.path = padding, threshold, stride, path

    def forward(self, sr: torch.Tensor, hr: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return ssl_loss(
            sr,
            hr,
            mask,
            search=self.search,
            patch=self.patch,
            h=self.h,
            kl_weight=self.kl_weight,
            l1_weight=self.l1_weight,
            padding=self.padding,
            threshold=self.threshold,
            stride=self.stride,
            path=self.path,
        )

    def extra_repr(self) -> str:
        return (
            f"search={self.search}, patch={self.patch}, h={self.h}, kl_weight={self.kl_weight}, "
            f"l1_weight={self.l1_weight}, padding={self.padding!r}, threshold={self.threshold}, stride={self.stride}, "
            f"path={self.path!r}"
        )
