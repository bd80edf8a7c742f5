"""Reading training images from folders: aligned faces and natural backgrounds.

Files ending in .png, .jpg, .jpeg or .webp (any case) are found recursively. A file that
cannot be decoded is logged once (``logging.WARNING``) and never tried again; the
folder only fails when no readable image is left.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Sorted paths of the image files under ``folder`` (recursive)."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"folder must be an existing directory, got {os.fspath(folder)!r}")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I")


def uint8_to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """Decode an image file into (3, H, W) float32 RGB in [0, 1], upright (its EXIF orientation applied); a 16-bit
    grey image is scaled by its real range (65535), not clipped to 8 bits. Raises OSError/ValueError if
    unreadable."""
    from PIL import ImageOps

    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in SIXTEEN_BIT_MODES:
            grey = np.asarray(img, dtype=np.float64) / 65535.0
            if grey.max(initial=0) > 1:
                raise ValueError(f"{os.fspath(path)}: a {img.mode} image with values above 65535")
            return torch.from_numpy(np.repeat(grey[None], 3, axis=0)).float()
        rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return uint8_to_tensor(rgb)


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Antialiased bicubic resize of (3, H, W) to ``size``, clamped to [0, 1]."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    out = F.interpolate(image[None], size=size, mode="bicubic", align_corners=False, antialias=True)
    return out[0].clamp(0, 1)


def crop_or_pad(image: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """A random ``size`` x ``size`` crop of (3, H, W).

    A side shorter than ``size`` is first reflect-padded at the bottom/right, as
    Real-ESRGAN does for DF2K images; when it is too short for reflect padding
    (shorter than half of ``size``) the image is upscaled instead so its short side
    equals ``size``.
    """
    h, w = image.shape[-2:]
    if min(h, w) * 2 <= size:
        factor = size / min(h, w)
        image = resize_image(image, (max(size, round(h * factor)), max(size, round(w * factor))))
        h, w = image.shape[-2:]
    pad_h, pad_w = max(0, size - h), max(0, size - w)
    if pad_h or pad_w:
        image = F.pad(image[None], (0, pad_w, 0, pad_h), mode="reflect")[0]
        h, w = image.shape[-2:]
    top = int(torch.randint(0, h - size + 1, (), generator=generator))
    left = int(torch.randint(0, w - size + 1, (), generator=generator))
    return image[:, top : top + size, left : left + size]


class ImageFolder:
    """Random access to the readable images of a folder.

    ``draw(generator)`` returns one random readable image as (3, H, W) float32 in [0, 1].
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.paths = list_images(folder)
        if not self.paths:
            raise ValueError(f"no {'/'.join(IMAGE_EXTENSIONS)} images under {os.fspath(folder)!r}")
        self._unreadable: set[int] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def draw(self, generator: torch.Generator) -> torch.Tensor:
        while len(self._unreadable) < len(self.paths):
            index = int(torch.randint(0, len(self.paths), (), generator=generator))
            if index in self._unreadable:
                continue
            try:
                return read_image(self.paths[index])
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
                self._unreadable.add(index)
                logger.warning("skipping unreadable image %s: %s", self.paths[index], error)
        raise RuntimeError(f"none of the {len(self.paths)} images under {os.fspath(self.folder)!r} is readable")


class FaceFolder(ImageFolder):
    """Aligned face images (FFHQ-style, any size), each resized to ``face_size`` x ``face_size``."""

    def __init__(self, folder: str | os.PathLike, face_size: int = 256) -> None:
        super().__init__(folder)
        if face_size < 1:
            raise ValueError(f"face_size must be >= 1, got {face_size}")
        self.face_size = face_size

    def draw(self, generator: torch.Generator) -> torch.Tensor:
        return resize_image(super().draw(generator), (self.face_size, self.face_size))


class BackgroundFolder(ImageFolder):
    """Natural images (DF2K-style): random ``crop_size`` x ``crop_size`` crops (see :func:`crop_or_pad`)."""

    def __init__(self, folder: str | os.PathLike, crop_size: int = 400) -> None:
        super().__init__(folder)
        if crop_size < 1:
            raise ValueError(f"crop_size must be >= 1, got {crop_size}")
        self.crop_size = crop_size

    def draw(self, generator: torch.Generator) -> torch.Tensor:
        return crop_or_pad(super().draw(generator), self.crop_size, generator)
