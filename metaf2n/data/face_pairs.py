"""``python -m metaf2n.data.face_pairs LQ_DIR -o OUT --detector retinaface:PATH --restorer gpen:PATH``: MetaF2N's
face pairs of low-quality photos, as its ``generate_test_faces.py`` makes them (the pairs its published test adapts
on), written as ``OUT/Face_LQ/NAME_i.png`` and ``OUT/Face_HQ/NAME_i.png``.

Per photo, with the defaults:

1. RetinaFace with GPEN's post-processing (:data:`metaf2n.faces.retinaface.RECIPES` ``"gpen"``: score > 0.9, top
   5000, the +1-pixel NMS at 0.4, at most 750 faces; a photo whose longer side exceeds 1500 px is detected at 1000
   px). Detection ``i`` (in that order) with a score below ``--threshold`` (0.9) is skipped, leaving a gap in the
   numbering, as the official loop does.
2. Its box corners truncated to int, the top-left clamped at 0; its five landmarks cast to int32 (truncated).
3. The face aligned to GPEN's reference points at 512 px (a least-squares similarity), warped bilinear with a black
   border (GPEN's ``warp_and_crop_face``).
4. Restored (``--restorer``; GPEN-BFR-512 in the official code) and truncated to 8 bits, not rounded.
5. Warped back onto a black canvas 4x the photo's size by GPEN's inverse affine (the template fitted back onto the
   landmarks at the inverse scale) times 4, bilinear.
6. ``Face_LQ`` = the photo's box ``[y0 : y1 + 1, x0 : x1 + 1]``; ``Face_HQ`` = the canvas ``[4 y0 : 4 y1 + 4,
   4 x0 : 4 x1 + 4]``, exactly 4x the LQ crop (black where the box reaches past the warped face).

A photo with no face is listed in ``OUT/manifest.json`` (the official code prints "No Face" and skips it).
``--template gfpgan`` aligns as facexlib does instead (its template, LMEDS fit, grey border); ``--detector mtcnn``
uses MTCNN's landmarks. ``metaf2n.infer`` cuts its faces with the same code (:func:`metaf2n_face_pairs`).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from metaf2n.data.images import list_images
from metaf2n.data.restorers import FaceRestorer
from metaf2n.faces.align import alignment_and_inverse, warp_face
from metaf2n.faces.detect import LandmarkFaceDetector

logger = logging.getLogger(__name__)
SCALE = 4
FACE_SIZE = 512
DEFAULT_THRESHOLD = 0.9


@dataclass
class BoxPair:
    """Detection ``index`` of a photo: its LQ box crop and the 4x HQ crop of the restored-face canvas, (h, w, 3)
    uint8 RGB, and the box (x0, y0, x1, y1) in LQ pixels."""

    index: int
    lq: np.ndarray
    hq: np.ndarray
    box: tuple[int, int, int, int]


def restore_uint8(restorer: FaceRestorer, face: np.ndarray) -> np.ndarray:
    """The restorer's output for an aligned (s, s, 3) uint8 RGB face, truncated to uint8 as the official code does."""
    x = torch.from_numpy(face.astype(np.float32) / 255).permute(2, 0, 1)[None]
    out = restorer(x)[0].clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    return (out * 255).astype(np.uint8)


def metaf2n_face_pairs(rgb: np.ndarray, detector: LandmarkFaceDetector, restorer: FaceRestorer,
                       threshold: float = DEFAULT_THRESHOLD, template: str = "gpen") -> list[BoxPair]:
    """MetaF2N's face pairs of one LQ photo (H, W, 3) uint8 RGB (see the module doc)."""
    height, width = rgb.shape[:2]
    pairs = []
    for index, face in enumerate(detector.detect_faces(rgb)):
        if face.score < threshold:
            continue
        x0, y0, x1, y1 = (int(v) for v in face.box[:4])
        x0, y0 = max(x0, 0), max(y0, 0)
        landmarks = face.landmarks.astype(np.int32).astype(np.float64)
        affine, inverse = alignment_and_inverse(landmarks, template, FACE_SIZE)
        aligned = warp_face(rgb, affine, FACE_SIZE, template)
        restored = restore_uint8(restorer, aligned)
        back = inverse * SCALE
        canvas = cv2.warpAffine(restored, back, (SCALE * width, SCALE * height), flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
        lq = rgb[y0 : y1 + 1, x0 : x1 + 1]
        hq = canvas[SCALE * y0 : SCALE * y1 + SCALE, SCALE * x0 : SCALE * x1 + SCALE]
        if lq.size == 0:
            logger.warning("detection %d: its box %s lies outside the %dx%d photo; skipped", index,
                           (x0, y0, x1, y1), width, height)
            continue
        pairs.append(BoxPair(index, np.ascontiguousarray(lq), np.ascontiguousarray(hq), (x0, y0, x1, y1)))
    return pairs


def write_face_pairs(lq_dir: Path, out: Path, detector, restorer, threshold: float, template: str,
                     progress: bool = True) -> dict:
    """:func:`metaf2n_face_pairs` of every photo in ``lq_dir`` into ``out``; returns the manifest."""
    from metaf2n.visualize import save_png

    photos = list_images(lq_dir)
    if not photos:
        raise ValueError(f"{lq_dir} holds no image")
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"photos": len(photos), "pairs": 0, "no_face": [], "template": template, "threshold": threshold}
    for path in tqdm(photos, desc="face pairs", unit="photo", disable=not progress):
        from PIL import Image

        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
        pairs = metaf2n_face_pairs(rgb, detector, restorer, threshold, template)
        if not pairs:
            manifest["no_face"].append(path.name)
            logger.warning("%s: no face", path.name)
        for pair in pairs:
            save_png(out / "Face_LQ" / f"{path.stem}_{pair.index}.png", pair.lq)
            save_png(out / "Face_HQ" / f"{path.stem}_{pair.index}.png", pair.hq)
        manifest["pairs"] += len(pairs)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def main(argv: list[str] | None = None) -> int:
    from metaf2n.faces.detect import load_detector
    from metaf2n.faces.restorers import load_restorer

    parser = argparse.ArgumentParser(prog="python -m metaf2n.data.face_pairs", description=__doc__.split("\n\n")[0])
    parser.add_argument("lq_dir", metavar="LQ_DIR", help="folder of low-quality photos")
    parser.add_argument("-o", "--out", required=True, help="output folder (Face_LQ/, Face_HQ/, manifest.json)")
    parser.add_argument("--detector", required=True, help="retinaface:PATH (GPEN's post-processing) or mtcnn[:PATH]")
    parser.add_argument("--restorer", required=True,
                        help="gpen:PATH (GPEN-BFR-512.pth), gfpgan:PATH or torchscript:PATH")
    parser.add_argument("--restorer-range", default="-1,1", help="a TorchScript restorer's value range")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help="skip detections scoring below this (default 0.9, as the official generator)")
    parser.add_argument("--template", choices=("gpen", "gfpgan"), default="gpen")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    from metaf2n.checks import parse_value_range

    if not Path(args.lq_dir).is_dir():
        parser.error(f"LQ_DIR {args.lq_dir!r} is not a folder")
    if not 0 <= args.threshold <= 1:
        parser.error(f"--threshold must be in [0, 1], got {args.threshold}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        from metaf2n.trainer import resolve_device

        device = resolve_device(args.device)
        detector = load_detector(args.detector, device, template=args.template)
        if not isinstance(detector, LandmarkFaceDetector):
            parser.error("--detector must find five landmarks (retinaface:PATH or mtcnn): the pairs are aligned")
        restorer = load_restorer(args.restorer, device, parse_value_range(args.restorer_range,
                                                                                "--restorer-range"))
        manifest = write_face_pairs(Path(args.lq_dir), Path(args.out), detector, restorer, args.threshold,
                                    args.template, not args.quiet)
    except ValueError as error:
        parser.error(str(error))
    print(f"{manifest['pairs']} face pairs from {manifest['photos']} photos ({len(manifest['no_face'])} without a "
          f"face) in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
