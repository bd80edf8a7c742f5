"""A tiny offline demo data set built from the colour photos bundled with scikit-image.

* faces: the astronaut's face (``skimage.data.astronaut()``), found with OpenCV's
  frontal-face Haar cascade, cropped as a square about twice the detection box and
  resized to 256x256, in eight deterministic variants (crop size, small shifts, mirror);
* backgrounds: the other bundled colour photos (cat, coffee, rocket, IHC slide,
  Hubble field, retina, motorcycle) whole, plus the largest band of the astronaut
  photo that stays clear of the face; photos are shrunk so the short side is <= 512.

The set is written once to ``cache_dir`` (default ``$METAF2N_CACHE/demo`` or
``~/.cache/metaf2n/demo``): files go to a temporary sibling directory which is then
renamed into place, so an interrupted build never leaves a half-written set behind.
Only files that ship inside the scikit-image wheel are used; nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from metaf2n.faces.detect import detect_faces, square_around

logger = logging.getLogger(__name__)

DEMO_VERSION = 1
FACE_SIZE = 256
MAX_BACKGROUND_SHORT_SIDE = 512
# (crop side / detection box side, shift x, shift y as fractions of the crop side, mirror)
FACE_VARIANTS = (
    (2.0, 0.00, 0.00, False),
    (2.0, 0.00, 0.00, True),
    (1.8, 0.05, 0.00, False),
    (1.8, -0.05, 0.00, True),
    (2.2, 0.00, 0.04, False),
    (2.2, 0.00, -0.04, True),
    (1.9, 0.03, 0.03, False),
    (2.1, -0.03, 0.03, True),
)


def default_cache_dir() -> Path:
    """``$METAF2N_CACHE/demo`` when the variable is set, else ``~/.cache/metaf2n/demo``."""
    root = os.environ.get("METAF2N_CACHE")
    return Path(root) / "demo" if root else Path.home() / ".cache" / "metaf2n" / "demo"


def _bundled_photos() -> dict[str, Callable[[], np.ndarray]]:
    from skimage import data

    return {
        "chelsea": data.chelsea,
        "coffee": data.coffee,
        "rocket": data.rocket,
        "immunohistochemistry": data.immunohistochemistry,
        "hubble_deep_field": data.hubble_deep_field,
        "retina": data.retina,
        "motorcycle": lambda: data.stereo_motorcycle()[0],
    }


def face_variants(rgb: np.ndarray, box: tuple[int, int, int, int], size: int = FACE_SIZE) -> list[Image.Image]:
    """The deterministic face crops of :data:`FACE_VARIANTS`, each ``size`` x ``size``."""
    photo = Image.fromarray(rgb)
    crops = []
    for ratio, dx, dy, mirror in FACE_VARIANTS:
        top, left, side = square_around(box, rgb.shape[:2], ratio, (dx, dy))
        crop = photo.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
        crops.append(crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mirror else crop)
    return crops


def region_away_from(rgb: np.ndarray, box: tuple[int, int, int, int], ratio: float = 2.2) -> np.ndarray:
    """The largest band (above, below, left or right) of the image outside ``ratio`` x the box."""
    top, left, side = square_around(box, rgb.shape[:2], ratio, (0.0, 0.0))
    bands = [
        rgb[:top],
        rgb[top + side :],
        rgb[:, :left],
        rgb[:, left + side :],
    ]
    return max(bands, key=lambda band: band.shape[0] * band.shape[1])


def _shrunk(rgb: np.ndarray, max_short_side: int = MAX_BACKGROUND_SHORT_SIDE) -> Image.Image:
    image = Image.fromarray(rgb)
    short = min(image.size)
    if short <= max_short_side:
        return image
    factor = max_short_side / short
    return image.resize((round(image.width * factor), round(image.height * factor)), Image.Resampling.LANCZOS)


def _is_valid(cache: Path) -> bool:
    try:
        manifest = json.loads((cache / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("version") != DEMO_VERSION:
        return False
    files = manifest.get("faces", []) + manifest.get("backgrounds", [])
    return bool(manifest.get("faces")) and all((cache / f).is_file() for f in files)


def _write_demo_set(target: Path) -> dict:
    from skimage import data

    faces_dir, backgrounds_dir = target / "faces", target / "backgrounds"
    faces_dir.mkdir()
    backgrounds_dir.mkdir()
    manifest: dict = {"version": DEMO_VERSION, "faces": [], "backgrounds": [], "face_boxes": {}}

    astronaut = data.astronaut()
    boxes = detect_faces(astronaut)
    if not boxes:
        raise RuntimeError("OpenCV's Haar cascade found no face in skimage.data.astronaut()")
    box = boxes[0]
    manifest["face_boxes"]["astronaut"] = list(box)
    for index, face in enumerate(face_variants(astronaut, box)):
        name = f"faces/astronaut_{index:02d}.png"
        face.save(target / name)
        manifest["faces"].append(name)

    photos = {"astronaut_background": lambda: region_away_from(astronaut, box), **_bundled_photos()}
    for name, load in photos.items():
        try:
            rgb = load()
        except (ImportError, OSError, ValueError) as error:  # a photo missing from this scikit-image build
            logger.warning("demo set: skipping skimage photo %s: %s", name, error)
            continue
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            continue
        file = f"backgrounds/{name}.png"
        _shrunk(np.ascontiguousarray(rgb)).save(target / file)
        manifest["backgrounds"].append(file)
    if not manifest["backgrounds"]:
        raise RuntimeError("no bundled scikit-image colour photo could be loaded for the demo backgrounds")
    (target / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def build_demo_set(cache_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Build (once) and return ``(faces_dir, backgrounds_dir)`` of the demo set under ``cache_dir``."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not _is_valid(cache):
        cache.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{cache.name}-build-", dir=cache.parent))
        try:
            manifest = _write_demo_set(staging)
            if cache.exists() and not _is_valid(cache):
                shutil.rmtree(cache)  # a stale or broken set from an older version
            try:
                os.rename(staging, cache)
                logger.info(
                    "built demo set at %s: %d faces, %d backgrounds",
                    cache, len(manifest["faces"]), len(manifest["backgrounds"]),
                )
            except OSError:
                if not _is_valid(cache):  # not a concurrent builder that won the race
                    raise
        finally:
            if staging.exists():
                shutil.rmtree(staging)
    return cache / "faces", cache / "backgrounds"
