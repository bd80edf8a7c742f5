"""``python -m metaf2n.data.make_testset -o OUT --mode iid|ood --count N --seed S``: a synthetic MetaF2N test set.

Each test photo is a face composited into a natural image, degraded as a whole by one Real-ESRGAN second-order draw:

* a ``--size`` x ``--size`` crop of a background photo (``--backgrounds``, default: the embedded demo set);
* an aligned face (``--faces``) resized to a side drawn from [``--face-min``, ``--face-max``] (multiples of 4),
  pasted at a random position (a multiple of 4) with a feathered border (1/8 of its side);
* ``iid``: the training degradation (Real-ESRGAN x4plus ranges); ``ood``: :data:`OOD_DEGRADATION`, stronger blur,
  noise and JPEG than training ever saw.

Layout (that of MetaF2N's FFHQ_iid / FFHQ_ood): ``GT/NAME.png`` (the composite), ``LQ/NAME.png`` (x4 smaller),
``Face_LQ/NAME.png`` (the pasted face's square in LQ), ``Face_HQ/NAME.png`` (the same square in GT, or a
``--restorer``'s output on the bicubic-upsampled LQ face), plus ``faces.json`` (each photo's face box in LQ pixels:
top, left, side) and ``manifest.json``. Seeded: the same arguments write the same files.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from metaf2n.checks import check_folders, join_range_flags, parse_value_range
from metaf2n.data.images import BackgroundFolder, FaceFolder, resize_image, uint8_to_tensor
from metaf2n.data.restorers import FaceRestorer
from metaf2n.degrade import REAL_ESRGAN_X4PLUS, DegradationConfig, apply_degradation, sample_degradation
from metaf2n.faces.align import feather
from metaf2n.visualize import save_png

logger = logging.getLogger(__name__)

# Out of the training distribution: first-stage blur sigma 3..5 (training 0.2..3), Gaussian noise sigma 30..45
# (training 1..30) and JPEG quality 15..30 (training 30..95) in both stages.
OOD_DEGRADATION = replace(
    REAL_ESRGAN_X4PLUS,
    blur_sigma=(3.0, 5.0),
    noise_range=(30.0, 45.0),
    noise_range2=(25.0, 40.0),
    gaussian_noise_prob=1.0,
    jpeg_range=(15.0, 30.0),
    jpeg_range2=(15.0, 30.0),
)
MODES: dict[str, DegradationConfig] = {"iid": REAL_ESRGAN_X4PLUS, "ood": OOD_DEGRADATION}


def make_photo(face: torch.Tensor, background: torch.Tensor, face_side: int, generator: torch.Generator):
    """Composite ``face`` (3, f, f) resized to ``face_side`` into ``background`` (3, S, S); returns the GT image and
    the paste box (top, left, side) in GT pixels, top and left multiples of 4."""
    size = background.shape[-1]
    face = resize_image(face, (face_side, face_side))
    top = 4 * int(torch.randint(0, (size - face_side) // 4 + 1, (), generator=generator))
    left = 4 * int(torch.randint(0, (size - face_side) // 4 + 1, (), generator=generator))
    alpha = torch.from_numpy(feather(face_side, face_side // 8))[None]
    gt = background.clone()
    region = gt[:, top : top + face_side, left : left + face_side]
    gt[:, top : top + face_side, left : left + face_side] = alpha * face + (1 - alpha) * region
    return gt, (top, left, face_side)


def _aligned_faces(detector, lq: torch.Tensor, gt: torch.Tensor, restorer, template: str):
    """(Face_LQ, Face_HQ, box) of the first detected face: with a ``restorer``, MetaF2N's face pair (the LQ box crop
    and the restored face pasted back x4); without, the face aligned as ``infer --face-recipe aligned`` aligns it
    (LQ 128 px) and the ground truth under the same alignment (512 px)."""
    from metaf2n.faces.align import scaled, template_alignment, warp_face

    rgb = (lq.permute(1, 2, 0).clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)
    if restorer is not None:  # real pseudo labels: MetaF2N's own face pairs (python -m metaf2n.data.face_pairs)
        from metaf2n.data.face_pairs import metaf2n_face_pairs

        pairs = metaf2n_face_pairs(rgb, detector, restorer, template=template)
        if not pairs:
            return None
        x0, y0, x1, y1 = pairs[0].box
        return uint8_to_tensor(pairs[0].lq), uint8_to_tensor(pairs[0].hq), (y0, x0, max(x1 - x0, y1 - y0) + 1)
    faces = detector.detect_faces(rgb)
    if not faces:
        return None
    affine = template_alignment(faces[0].landmarks, template, 512)  # LQ pixels -> 512 px face

    def warp(image: torch.Tensor, matrix, size: int) -> torch.Tensor:
        array = image.permute(1, 2, 0).clamp(0, 1).numpy().astype(np.float32) * 255
        return torch.from_numpy(warp_face(array, matrix, size, template) / 255).permute(2, 0, 1).float().clamp(0, 1)

    face_lq = warp(lq, scaled(affine, 0.25), 128)
    if restorer is None:
        face_hq = warp(gt, np.hstack([affine[:, :2] / 4, affine[:, 2:]]), 512)  # GT pixel = 4 x LQ pixel
    else:
        up = F.interpolate(face_lq[None], scale_factor=4, mode="bicubic", align_corners=False)
        face_hq = restorer(up.clamp(0, 1))[0]
    x, y, w, h = faces[0].xywh()
    return face_lq, face_hq, (y, x, max(w, h))


def make_testset(
    out: str | os.PathLike,
    mode: str = "iid",
    count: int = 10,
    seed: int = 0,
    faces_dir: str | os.PathLike | None = None,
    backgrounds_dir: str | os.PathLike | None = None,
    size: int = 512,
    face_min: int = 192,
    face_max: int = 256,
    restorer: FaceRestorer | None = None,
    progress: bool = True,
    detector=None,
    template: str = "gfpgan",
) -> Path:
    """Write the test set (see the module doc) to ``out`` atomically (a temporary sibling folder renamed).

    With a ``detector`` (a :class:`~metaf2n.faces.detect.LandmarkFaceDetector`: MTCNN or RetinaFace), ``Face_LQ``/
    ``Face_HQ`` come from the first detected face of the LQ photo: with a ``restorer``, MetaF2N's face pair
    (:func:`metaf2n.data.face_pairs.metaf2n_face_pairs`, as ``metaf2n.infer`` cuts them); without one (ground-truth
    pseudo labels), the face aligned to the ``template`` (LQ 128 px) and the GT under the same alignment (512 px). A
    photo where nothing is detected keeps the pasted face's square, and ``manifest.json`` says which photos those
    are."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {tuple(MODES)}, got {mode!r}")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if size < 16 or size % 4:
        raise ValueError(f"size must be a multiple of 4 and >= 16, got {size}")
    if not (4 <= face_min <= face_max <= size) or face_min % 4 or face_max % 4:
        raise ValueError(f"need 4 <= face_min <= face_max <= size, multiples of 4; got {face_min}, {face_max}")
    if faces_dir is None or backgrounds_dir is None:
        from metaf2n.data.demo import build_demo_set

        demo_faces, demo_backgrounds = build_demo_set()
        faces_dir = faces_dir or demo_faces
        backgrounds_dir = backgrounds_dir or demo_backgrounds
    faces = FaceFolder(faces_dir, face_max)
    backgrounds = BackgroundFolder(backgrounds_dir, size)
    target = Path(out)
    if target.exists():
        raise ValueError(f"output folder {os.fspath(out)!r} already exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    generator = torch.Generator().manual_seed(seed)
    boxes, names, undetected = {}, [], []
    try:
        for index in tqdm(range(count), desc=f"test set ({mode})", unit="photo", disable=not progress):
            name = f"{index:04d}"
            face_side = 4 * int(torch.randint(face_min // 4, face_max // 4 + 1, (), generator=generator))
            gt, (top, left, side) = make_photo(faces.draw(generator), backgrounds.draw(generator), face_side,
                                               generator)
            params = sample_degradation(generator, MODES[mode])
            lq = apply_degradation(params, gt[None], generator)[0]
            box = (top // 4, left // 4, side // 4)
            aligned = _aligned_faces(detector, lq, gt, restorer, template) if detector is not None else None
            if aligned is not None:
                face_lq, face_hq, box = aligned
            else:
                if detector is not None:
                    undetected.append(name)
                face_lq = lq[:, box[0] : box[0] + box[2], box[1] : box[1] + box[2]]
                if restorer is None:
                    face_hq = gt[:, top : top + side, left : left + side]
                else:
                    up = F.interpolate(face_lq[None], size=(side, side), mode="bicubic", align_corners=False)
                    face_hq = restorer(up.clamp(0, 1))[0]
            for folder, image in (("GT", gt), ("LQ", lq), ("Face_LQ", face_lq), ("Face_HQ", face_hq)):
                rgb = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
                save_png(staging / folder / f"{name}.png", rgb)
            boxes[name] = [list(box)]
            names.append(name)
        (staging / "faces.json").write_text(json.dumps(boxes, indent=1))
        manifest = {"mode": mode, "count": count, "seed": seed, "size": size, "face_range": [face_min, face_max],
                    "faces": os.fspath(faces_dir), "backgrounds": os.fspath(backgrounds_dir),
                    "face_hq": "ground truth" if restorer is None else "restorer", "images": names,
                    "face_source": "paste box" if detector is None else "detected and aligned",
                    "not_detected": undetected}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1))
        os.rename(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m metaf2n.data.make_testset", description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--out", required=True, help="output folder (must not exist)")
    parser.add_argument("--mode", choices=tuple(MODES), default="iid")
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--faces", help="aligned face images (default: the embedded demo set)")
    parser.add_argument("--backgrounds", help="background photos (default: the embedded demo set)")
    parser.add_argument("--size", type=int, default=512, help="GT side (default 512)")
    parser.add_argument("--face-min", type=int, default=192)
    parser.add_argument("--face-max", type=int, default=256)
    parser.add_argument("--restorer", help="gfpgan:PATH, gpen:PATH or torchscript:PATH for Face_HQ (default: the GT face)")
    parser.add_argument("--restorer-range", default="0,1")
    parser.add_argument("--detector", help="mtcnn[:PATH] or retinaface:PATH: cut Face_LQ/Face_HQ by detection + "
                                           "alignment, as infer does (default: the pasted face's square)")
    parser.add_argument("--template", choices=("gfpgan", "gpen"), default=None,
                        help="with --detector: gpen (MetaF2N's face pairs, the default with --restorer, as infer) or "
                             "gfpgan (the default for ground-truth faces)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(join_range_flags(sys.argv[1:] if argv is None else argv))
    try:
        check_folders(args, ("faces", "backgrounds"))
        value_range = parse_value_range(args.restorer_range, "--restorer-range")
    except ValueError as error:
        parser.error(f"{error} (neither --faces nor --backgrounds means the embedded demo set)")
    restorer = None
    if args.restorer:
        from metaf2n.faces.restorers import load_restorer

        try:
            restorer = load_restorer(args.restorer, "cpu", value_range)
        except ValueError as error:
            parser.error(str(error))
    detector = None
    if args.detector:
        from metaf2n.faces.detect import LandmarkFaceDetector, load_detector

        try:
            args.template = args.template or ("gpen" if args.restorer else "gfpgan")
            detector = load_detector(args.detector, template=args.template)
        except ValueError as error:
            parser.error(f"--detector: {error}")
        if not isinstance(detector, LandmarkFaceDetector):
            parser.error(f"--detector must find landmarks (mtcnn or retinaface), got {args.detector!r}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        path = make_testset(args.out, args.mode, args.count, args.seed, args.faces, args.backgrounds, args.size,
                            args.face_min, args.face_max, restorer, not args.quiet, detector,
                            args.template or "gfpgan")
    except ValueError as error:
        parser.error(str(error))
    print(f"test set written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
