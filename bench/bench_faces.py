"""Faces per second of the face detectors and restorers (random weights: speed does not depend on their values).

    python bench/bench_faces.py [--device cpu|cuda] [--batches 1 8] [--out results/bench]

Detectors run on one 640 x 480 photo per call (batch = photos per forward for RetinaFace); restorers on batches of
aligned faces at their own size. Prints a table and writes ``bench_faces_<device>.md``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch


def timed(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> int:
    from metaf2n.faces.detect import HaarFaceDetector
    from metaf2n.faces.gfpgan import GFPGANv1Clean
    from metaf2n.faces.gpen import GPEN
    from metaf2n.faces.retinaface import RetinaFace

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default="results/bench")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    rows = []
    photo = np.ascontiguousarray(__import__("skimage.data", fromlist=["astronaut"]).astronaut())
    photo = np.asarray(__import__("PIL.Image", fromlist=["Image"]).fromarray(photo).resize((640, 480)))
    haar = HaarFaceDetector()
    seconds = timed(lambda: haar.detect(photo), max(3, args.repeats), torch.device("cpu"))
    rows.append(("detector", "Haar cascade (OpenCV, CPU)", "640x480", 1, seconds))
    models = [("detector", "RetinaFace ResNet-50", RetinaFace("resnet50"), (480, 640)),
              ("detector", "RetinaFace MobileNet-0.25", RetinaFace("mobilenet0.25"), (480, 640)),
              ("restorer", "GFPGAN v1.3/v1.4 (512)", GFPGANv1Clean(), (512, 512)),
              ("restorer", "GPEN-BFR-512", GPEN(512), (512, 512)),
              ("restorer", "GPEN-BFR-256", GPEN(256), (256, 256))]
    for role, name, model, (h, w) in models:
        model = model.to(device).eval()
        for batch in args.batches:
            x = torch.rand(batch, 3, h, w, device=device)
            with torch.no_grad():
                seconds = timed(lambda: model(x), args.repeats, device)
            rows.append((role, name, f"{w}x{h}", batch, seconds))
            print(f"{name} batch {batch}: {seconds:.3f} s", flush=True)
    lines = [f"Faces (detectors: photos) per second on {device} ({torch.get_num_threads()} threads), random weights:",
             "", "| role | model | input | batch | s per call | per second |", "|---|---|---|---|---|---|"]
    for role, name, size, batch, seconds in rows:
        lines.append(f"| {role} | {name} | {size} | {batch} | {seconds:.3f} | {batch / seconds:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bench_faces_{device.type}.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
