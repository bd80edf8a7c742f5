"""Shared fixtures: small real photos (shipped with scikit-image) as (1, 3, H, W) float tensors in [0, 1]."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def photo(name: str, top: int, left: int, size: int) -> torch.Tensor:
    import skimage.data

    rgb = np.asarray(getattr(skimage.data, name)())[top : top + size, left : left + size, :3]
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float() / 255


def degraded(hr: torch.Tensor, scale: int = 4) -> torch.Tensor:
    """A plausible SR output for hr: bicubic down and up by ``scale``, rounded to 8 bits."""
    small = torch.nn.functional.interpolate(hr, scale_factor=1 / scale, mode="area")
    up = torch.nn.functional.interpolate(small, size=hr.shape[-2:], mode="bicubic", align_corners=False)
    return (up.clamp(0, 1) * 255).round() / 255


@pytest.fixture(scope="session")
def photo_pair():
    """A 2-image batch of 64x64 real-photo crops (different edge densities) and their degraded versions."""
    hr = torch.cat([photo("astronaut", 180, 200, 64), photo("coffee", 100, 250, 64)])
    return degraded(hr), hr


@pytest.fixture(scope="session")
def lpips_model():
    """LPIPS with the real AlexNet weights (scripts/setup.sh runs `python -m metaf2n.weights lpips`)."""
    from metaf2n.losses import lpips_alex

    try:
        return lpips_alex()
    except FileNotFoundError as error:
        pytest.fail(f"LPIPS weights are missing: {error}")
