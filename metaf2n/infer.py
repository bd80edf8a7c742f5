"""``python -m metaf2n.infer``: adapt the SR model to each photo through its faces, then super-resolve it x4.

    python -m metaf2n.infer photo.jpg photos/ -o out/ --checkpoint runs/demo/checkpoints/latest.pt \\
        --restorer gpen_512.pt --restorer-range -1,1
    python -m metaf2n.infer testset/LQ -o out/ --checkpoint ckpt.pt --face-lq testset/Face_LQ --face-hq testset/Face_HQ

Writes ``OUTDIR/NAME.png`` and ``OUTDIR/summary.jsonl`` (one record per photo; inputs that share a name get
``NAME-2.png``, ``NAME-3.png``...). An OUTDIR holding an earlier run's results is refused unless ``--overwrite``
(which replaces them and appends to the summary); a result that would overwrite an input is always refused. A photo
without a usable face is super-resolved by the un-adapted model, with the reason in the summary; a file that cannot be
processed is reported and skipped, and the exit status is 1 when any file failed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from metaf2n.checks import check_folders, join_range_flags, parse_value_range
from metaf2n.data.images import IMAGE_EXTENSIONS, list_images, read_image, uint8_to_tensor
from metaf2n.faces.detect import DETECTOR_HELP, LandmarkFaceDetector, check_detector_spec, load_detector
from metaf2n.faces.restorers import NetworkRestorer, load_restorer
from metaf2n.inference import (
    ENGINES,
    FacePair,
    adapt_to_faces,
    face_preview,
    faces_from_files,
    faces_from_landmarks,
    faces_from_photo,
    load_model,
    resolve_engine,
    sample_face_patches,
    sample_official_patches,
    tiled_super_resolve,
    use_channels_last,
)
from metaf2n.io import append_jsonl, atomic_write_text
from metaf2n.visualize import save_png

logger = logging.getLogger("metaf2n.infer")
COLOUR_MODES = ("RGB", "P")


class PhotoError(ValueError):
    """A photo that cannot be processed; the message says why."""


def collect_inputs(inputs: list[str]) -> list[Path]:
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths.extend(list_images(path))
        elif path.is_file():
            paths.append(path)
        else:
            raise ValueError(f"input {item!r} is neither a file nor a folder")
    return paths


def read_rgb_photo(path: Path) -> torch.Tensor:
    """(3, H, W) float in [0, 1]; grey, alpha and other non-RGB images are refused with a message."""
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)  # a rotated camera JPEG is super-resolved upright
            mode = image.mode
            if mode not in COLOUR_MODES or (mode == "P" and "transparency" in image.info):
                raise PhotoError(
                    f"{path.name}: a {mode} image; MetaF2N super-resolves RGB photos (convert it to RGB first, "
                    "e.g. PIL's Image.convert('RGB'))"
                )
            rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except PhotoError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise PhotoError(f"{path.name}: cannot be read as an image ({error})") from None
    if min(rgb.shape[:2]) < 4:
        raise PhotoError(f"{path.name}: {rgb.shape[1]}x{rgb.shape[0]} pixels is too small to super-resolve")
    return uint8_to_tensor(rgb)


def face_files(folder: Path, stem: str) -> list[Path]:
    """``folder/STEM.ext`` or ``folder/STEM_k.ext`` (several faces of one photo), sorted."""
    found = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS
             and (p.stem == stem or (p.stem.startswith(stem + "_") and p.stem[len(stem) + 1:].isdigit()))]
    return sorted(found)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m metaf2n.infer", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="photos or folders of photos")
    parser.add_argument("-o", "--out", required=True, help="output folder")
    parser.add_argument("--checkpoint", required=True,
                        help="a metaf2n checkpoint (OUT/checkpoints/latest.pt) or a Real-ESRGAN RRDBNet x4plus one")
    parser.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights when it has them")
    faces = parser.add_argument_group("faces")
    faces.add_argument("--detector", default="auto",
                       help=DETECTOR_HELP + "; faces with landmarks are aligned to the FFHQ template (default auto)")
    faces.add_argument("--face-recipe", choices=("metaf2n", "aligned"), default="metaf2n",
                       help="faces from landmarks: metaf2n (MetaF2N's face pairs: LQ box crops and the restored face "
                            "pasted back x4, as python -m metaf2n.data.face_pairs; the default) or aligned (LQ face "
                            "aligned to the template at a quarter of the restorer's size, and its restoration)")
    faces.add_argument("--template", choices=("gfpgan", "gpen"), default=None,
                       help="FFHQ template and official pipeline for landmark faces (default gpen for the metaf2n "
                            "recipe, gfpgan for aligned); it also picks RetinaFace's post-processing")
    faces.add_argument("--det-threshold", type=float, default=None,
                       help="RetinaFace's score threshold (default: the pipeline's, 0.97 for gfpgan, 0.9 for gpen) and "
                            "the metaf2n recipe's skip rule (default 0.9)")
    faces.add_argument("--restorer", help="gfpgan:PATH (GFPGANv1.3/1.4.pth), gpen:PATH (GPEN-BFR-512/256.pth) or "
                                          "torchscript:PATH / PATH (a TorchScript export)")
    faces.add_argument("--restorer-range", default="0,1", help="the restorer's value range, e.g. -1,1 (default 0,1)")
    faces.add_argument("--restorer-size", type=int, default=512,
                       help="face side a TorchScript restorer expects (default 512; GFPGAN/GPEN use their own)")
    faces.add_argument("--face-lq", help="precomputed LR faces, files named after the photo (NAME.png or NAME_k.png)")
    faces.add_argument("--face-hq", help="their pseudo-HQ faces, same names")
    faces.add_argument("--face-margin", type=float, default=1.5, help="crop side / detected box side (default 1.5)")
    faces.add_argument("--min-face", type=int, default=None,
                       help="smallest face side to detect, LR pixels (default: 24 for haar, 20 for mtcnn)")
    adapt = parser.add_argument_group("adaptation")
    adapt.add_argument("--patches", type=int, default=16,
                       help="16 -> 64 px patch pairs pooled over the faces (per face with --official-test)")
    adapt.add_argument("--official-test", action="store_true",
                       help="MetaF2N's own test step: --patches per face file (a face of <= 16 LR pixels is used whole "
                            "only when it comes first), the whole photo in one pass (no tiles)")
    adapt.add_argument("--steps", type=int, default=1, help="inner SGD steps (default 1; 0 disables adaptation)")
    adapt.add_argument("--inner-lr", type=float, default=None, help="default: the checkpoint's training config")
    run = parser.add_argument_group("run")
    run.add_argument("--tile", type=int, default=256, help="LR tile side (0: whole photo; default 256)")
    run.add_argument("--tile-overlap", type=int, default=32, help="LR context pixels around each tile (default 32)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    run.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    run.add_argument("--memory-format", choices=("auto", "channels_last", "contiguous"), default="auto",
                     help="the SR network's layout for adaptation and the torch engine: auto is channels_last on the "
                          "CPU (1.1-1.4x faster for x4plus) and contiguous (NCHW) elsewhere")
    run.add_argument("--engine", choices=ENGINES, default="auto",
                     help="how the photo is super-resolved after adaptation: winograd (our Winograd F(4x4, 3x3) "
                          "kernels: float32 RRDBNet on the CPU, 2-2.5x faster than torch for x4plus), torch (the "
                          "network as it is), or auto: winograd where it applies on a CPU with AVX2 or AVX-512")
    run.add_argument("--face-preview", action="store_true",
                     help="also write NAME_faces.png: the bicubic x4 photo with the restored faces pasted back "
                          "(mtcnn and retinaface detectors, --face-recipe aligned)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the results of an earlier run in OUTDIR (its summary records are kept and the new "
                          "ones appended); without it such a folder is refused. Inputs are never overwritten")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    try:
        check_folders(args, ("face_lq", "face_hq"))
        args.restorer_range = parse_value_range(args.restorer_range, "--restorer-range")
        check_detector_spec(args.detector)
    except ValueError as error:
        parser.error(str(error))
    for name, minimum in (("patches", 1), ("steps", 0), ("tile", 0), ("tile_overlap", 0), ("restorer_size", 16),
                          ("min_face", 1)):
        if getattr(args, name) is not None and getattr(args, name) < minimum:
            parser.error(f"--{name.replace('_', '-')} must be >= {minimum}, got {getattr(args, name)}")
    if args.template is None:
        args.template = "gpen" if args.face_recipe == "metaf2n" else "gfpgan"
    if args.face_preview and args.face_recipe != "aligned":
        parser.error("--face-preview needs --face-recipe aligned (the metaf2n recipe's faces are box crops)")
    if args.det_threshold is not None and not 0 <= args.det_threshold <= 1:
        parser.error(f"--det-threshold must be in [0, 1], got {args.det_threshold}")
    if not 0.5 <= args.face_margin <= 10:  # also refuses nan
        parser.error(f"--face-margin must be in [0.5, 10] (crop side / detected box side), got {args.face_margin}")
    if args.inner_lr is not None and not 0 <= args.inner_lr < float("inf"):
        parser.error(f"--inner-lr must be >= 0, got {args.inner_lr}")


def output_names(paths: list[Path]) -> dict[Path, str]:
    """Each input's output stem: its own stem, or ``STEM-2``, ``STEM-3``... when inputs share a stem (a/photo.png,
    b/photo.png, photo.jpg), so that no result overwrites another."""
    names: dict[Path, str] = {}
    taken: set[str] = set()
    stems = [p.stem for p in paths]
    for path in paths:
        name, k = path.stem, 1
        while name in taken or (k > 1 and name in stems):
            k += 1
            name = f"{path.stem}-{k}"
        taken.add(name)
        names[path] = name
    return names


def check_outputs(paths: list[Path], names: dict[Path, str], out_dir: Path, overwrite: bool) -> None:
    """Refuse to write over an input, or over an earlier run's results unless ``overwrite``."""
    inputs = {p.resolve() for p in paths}
    outputs = [out_dir / f"{names[p]}{suffix}" for p in paths for suffix in (".png", "_faces.png")]
    clobbered = [o for o in outputs if o.resolve() in inputs]
    if clobbered:
        raise ValueError(f"-o {out_dir}: the result {clobbered[0].name} would overwrite the input photo of that "
                         "name; choose another output folder")
    existing = [o for o in outputs + [out_dir / "summary.jsonl"] if o.exists()]
    if existing and not overwrite:
        shown = ", ".join(o.name for o in existing[:3]) + (f" and {len(existing) - 3} more" if len(existing) > 3
                                                             else "")
        raise ValueError(f"-o {out_dir} already holds results ({shown}); pass --overwrite to replace them (earlier "
                         "summary records are kept), or choose another folder")


def process_photo(path: Path, args, model, detector, restorer, device, out_dir: Path, name: str | None = None) -> dict:
    start = time.perf_counter()
    record = {"image": path.name, "output": None, "faces_found": 0, "faces_used": 0, "patches": 0,
              "inner_before": None, "inner_after": None, "adapted": False, "reason": None}
    photo = read_rgb_photo(path)
    generator = torch.Generator().manual_seed(args.seed ^ zlib.crc32(path.stem.encode()))
    pairs = []
    if args.steps == 0:
        record["reason"] = "adaptation disabled (--steps 0)"
    elif args.face_lq is not None:
        lq_files = face_files(Path(args.face_lq), path.stem)
        hq_files = face_files(Path(args.face_hq), path.stem)
        record["faces_found"] = len(lq_files)
        if not lq_files:
            record["reason"] = f"no face file named {path.stem}[_k].* in --face-lq"
        elif [p.stem for p in lq_files] != [p.stem for p in hq_files]:
            record["reason"] = "--face-lq and --face-hq files differ: " + \
                f"{[p.name for p in lq_files]} vs {[p.name for p in hq_files]}"
        else:
            pairs = faces_from_files(lq_files, hq_files, read_image)
    elif restorer is None:
        record["reason"] = "no pseudo-HQ faces: give --restorer or --face-lq/--face-hq"
    elif isinstance(detector, LandmarkFaceDetector) and args.face_recipe == "metaf2n":
        from metaf2n.data.face_pairs import DEFAULT_THRESHOLD, metaf2n_face_pairs

        rgb = (photo.permute(1, 2, 0) * 255 + 0.5).to(torch.uint8).numpy()
        threshold = DEFAULT_THRESHOLD if args.det_threshold is None else args.det_threshold
        box_pairs = metaf2n_face_pairs(rgb, detector, restorer, threshold, args.template)
        record["faces_found"] = len(box_pairs)
        pairs = [FacePair(uint8_to_tensor(p.lq), uint8_to_tensor(p.hq)) for p in box_pairs]
        if not pairs:
            record["reason"] = "no face detected"
    elif isinstance(detector, LandmarkFaceDetector):
        rgb = (photo.permute(1, 2, 0) * 255 + 0.5).to(torch.uint8).numpy()
        detections = detector.detect_faces(rgb)
        record["faces_found"] = len(detections)
        pairs = faces_from_landmarks(photo.to(device), [d.landmarks for d in detections], restorer,
                                     args.restorer_size, args.template)
        if not pairs:
            record["reason"] = "no face detected"
        elif args.face_preview:
            save_png(out_dir / f"{name or path.stem}_faces.png", face_preview(photo, pairs))
            record["face_preview"] = f"{name or path.stem}_faces.png"
    else:
        pairs, record["faces_found"] = faces_from_photo(photo.to(device), detector, restorer, args.restorer_size,
                                                        args.face_margin)
        if not pairs:
            record["reason"] = "no face detected"
    params = None
    if pairs:
        faces_used = len(pairs)
        if args.official_test:
            lr_groups, hq_groups, coordinates = sample_official_patches(pairs, args.patches, generator)
            faces_used = len({face for face, _, _ in coordinates})
        else:
            lr_groups, hq_groups = sample_face_patches(pairs, args.patches, generator)
        adaptation = adapt_to_faces(model, lr_groups, hq_groups, args.steps, args.inner_lr, args.precision)
        record.update(faces_used=faces_used, patches=sum(len(g) for g in lr_groups),
                      inner_before=adaptation.inner_before, inner_after=adaptation.inner_after)
        if np.isfinite(adaptation.inner_after) and all(torch.isfinite(p).all() for p in adaptation.params.values()):
            params = adaptation.params
            record["adapted"] = True
        else:
            record["reason"] = "adaptation gave non-finite weights"
    if record["reason"]:
        logger.warning("%s: not adapted (%s); using the un-adapted model", path.name, record["reason"])
    bar = None if args.quiet else (lambda cores: tqdm(cores, desc=f"{path.name} tiles", leave=False, unit="tile"))
    tile = 0 if args.official_test else args.tile
    sr = tiled_super_resolve(model.sr, photo[None].to(device), params, tile, args.tile_overlap, args.precision, bar,
                             args.engine)
    output = out_dir / f"{name or path.stem}.png"
    save_png(output, (sr[0].permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8))
    record["output"] = output.name
    record["engine"] = args.engine
    record["time_s"] = round(time.perf_counter() - start, 3)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(join_range_flags(sys.argv[1:] if argv is None else argv))
    check_args(parser, args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from metaf2n.trainer import resolve_device

    try:
        device = resolve_device(args.device)
        paths = collect_inputs(args.inputs)
        model = load_model(args.checkpoint, device, args.ema)
    except ValueError as error:
        parser.error(str(error))
    try:
        args.engine = resolve_engine(args.engine, model.sr, device, args.precision)
    except ValueError:
        parser.error("--engine winograd needs --device cpu, --precision fp32 and an RRDBNet whose num_feat and "
                     "num_grow_ch are multiples of 16")
    if not paths:
        parser.error("no images found in the inputs")
    if args.memory_format == "channels_last" or (args.memory_format == "auto" and device.type == "cpu"):
        use_channels_last(model.sr)
    if model.masknet is None:
        logger.warning("no MaskNet in %s: the face loss is unweighted (W = 1)", args.checkpoint)
    restorer = None
    if args.restorer:
        try:
            restorer = load_restorer(args.restorer, device, args.restorer_range, args.precision)
        except ValueError as error:
            parser.error(str(error))
        if isinstance(restorer, NetworkRestorer):
            args.restorer_size = restorer.size
    detector = None
    if args.steps > 0 and args.face_lq is None:
        try:
            detector = load_detector(args.detector, device, args.min_face, args.template, args.det_threshold)
        except ValueError as error:
            parser.error(f"--detector: {error}")
    out_dir = Path(args.out)
    names = output_names(paths)
    try:
        check_outputs(paths, names, out_dir, args.overwrite)
    except ValueError as error:
        parser.error(str(error))
    for path, name in names.items():
        if name != path.stem:
            logger.warning("%s shares its name with another input: its result is %s.png", path, name)
    summary = out_dir / "summary.jsonl"
    try:
        if out_dir.exists() and not out_dir.is_dir():
            raise OSError(f"{out_dir} is a file")
        out_dir.mkdir(parents=True, exist_ok=True)
        if not summary.exists():
            atomic_write_text(summary, "")
    except OSError as error:
        parser.error(f"-o {os.fspath(out_dir)!r} cannot be written: {error.strerror or error}")
    failed = 0
    for path in tqdm(paths, desc="photos", unit="photo", disable=args.quiet):
        try:
            record = process_photo(path, args, model, detector, restorer, device, out_dir, names[path])
        except PhotoError as error:
            failed += 1
            logger.error("%s", error)
            record = {"image": path.name, "error": str(error)}
        append_jsonl(summary, record)
    if failed:
        print(f"{failed} of {len(paths)} files failed (see {summary})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
