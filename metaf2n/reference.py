"""The self-similarity maths of DESIGN.md in plain PyTorch: the oracle for tests and benchmarks.

Written for clarity, not speed: every masked pixel gathers its tile, ``unfold`` lists the K candidate patches, and
autograd differentiates everything. Rows are processed ``chunk`` at a time so memory stays bounded in the forward
pass (autograd still keeps every chunk's intermediates for the backward pass: about N x K x C x patch^2 values).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PROB_FLOOR = 1e-10


def _tiles(image: torch.Tensor, positions: torch.Tensor, search: int, patch: int, padding: str) -> torch.Tensor:
    """Tiles of radius s + f around each position: (n, C, 2(s+f)+1, 2(s+f)+1)."""
    s, f = search // 2, patch // 2
    if padding == "image":
        radius, pad = s + f, s + f
    elif padding == "window":
        radius, pad = s, s
    else:
        raise ValueError(f'padding must be "image" or "window", got {padding!r}')
    padded = F.pad(image, (pad, pad, pad, pad), mode="reflect")
    offsets = torch.arange(-radius, radius + 1, device=image.device)
    b, y, x = positions.long().unbind(1)
    ys = (y + pad)[:, None] + offsets  # (n, side)
    xs = (x + pad)[:, None] + offsets
    tiles = padded[b[:, None, None], :, ys[:, :, None], xs[:, None, :]]  # (n, side, side, C)
    tiles = tiles.permute(0, 3, 1, 2)
    if padding == "window":
        # Candidate pixels outside the (2s+1)^2 window read zero.
        tiles = F.pad(tiles, (f, f, f, f))
    return tiles


def _rows(image: torch.Tensor, positions: torch.Tensor, search: int, patch: int, h: float, padding: str):
    tiles = _tiles(image, positions, search, patch, padding)
    n, C = tiles.shape[:2]
    s = search // 2
    query = tiles[:, :, s : s + patch, s : s + patch].reshape(n, C * patch * patch, 1)
    candidates = F.unfold(tiles, patch)  # (n, C * patch^2, search^2), offsets row-major
    d2 = (candidates - query).pow(2).mean(dim=1)
    return torch.softmax(-d2 / h, dim=1)


def similarity_graph(
    image: torch.Tensor,
    positions: torch.Tensor,
    search: int = 25,
    patch: int = 9,
    h: float = 0.004,
    padding: str = "image",
    chunk: int = 256,
) -> torch.Tensor:
    """Rows ``S_bar(p, .)`` for every position: (N, search**2)."""
    parts = [
        _rows(image, positions[i : i + chunk], search, patch, h, padding) for i in range(0, positions.shape[0], chunk)
    ]
    if not parts:
        return image.new_zeros((0, search * search))
    return torch.cat(parts)


def ssl_loss(
    sr: torch.Tensor,
    hr: torch.Tensor,
    positions: torch.Tensor,
    search: int = 25,
    patch: int = 9,
    h: float = 0.004,
    kl_weight: float = 1000.0,
    l1_weight: float = 1000.0,
    padding: str = "image",
    chunk: int = 256,
) -> torch.Tensor:
    """``kl_weight * mean(t (log t - log max(S_sr, eps))) + l1_weight * mean|S_sr - S_hr|`` over N x K."""
    n = positions.shape[0]
    if n == 0:
        return (sr * 0).sum()
    hr = hr.detach()
    kl = sr.new_zeros(())
    l1 = sr.new_zeros(())
    for i in range(0, n, chunk):
        rows = positions[i : i + chunk]
        s_sr = _rows(sr, rows, search, patch, h, padding)
        s_hr = _rows(hr, rows, search, patch, h, padding)
        t = s_hr.clamp_min(PROB_FLOOR)
        kl = kl + (t * (t.log() - s_sr.clamp_min(PROB_FLOOR).log())).sum()
        l1 = l1 + (s_sr - s_hr).abs().sum()
    count = n * search * search
    return kl_weight * kl / count + l1_weight * l1 / count
