"""Face detection: the :class:`FaceDetector` interface and OpenCV's frontal-face Haar cascade behind it.

Boxes are ``(x, y, w, h)`` in pixels of the image given; :func:`square_around` turns one into a square crop
``(top, left, side)`` that is ``ratio`` times its larger side, optionally shifted, and moved inside the image.
"""

from __future__ import annotations

import abc
import logging
import os
from dataclasses import dataclass

import numpy as np

Box = tuple[int, int, int, int]
logger = logging.getLogger(__name__)
DETECTOR_HELP = ("auto (mtcnn when its weights are cached, else haar), haar (OpenCV's cascade: square crops, no "
                 "landmarks), mtcnn[:PATH] (five landmarks; PATH defaults to the file `python -m metaf2n.weights "
                 "mtcnn` caches) or retinaface:PATH (detection_Resnet50_Final.pth or "
                 "detection_mobilenet0.25_Final.pth)")


def square_around(
    box: Box, image_hw: tuple[int, int], ratio: float = 1.0, shift: tuple[float, float] = (0.0, 0.0)
) -> tuple[int, int, int]:
    """``(top, left, side)`` of a square ``ratio`` times the box's larger side around its centre, shifted by
    ``shift`` (fractions of the side), clipped to at most the image's short side and moved inside the image."""
    x, y, w, h = box
    height, width = image_hw
    side = max(1, min(int(round(max(w, h) * ratio)), height, width))
    centre_x = x + w / 2 + shift[0] * side
    centre_y = y + h / 2 + shift[1] * side
    left = int(round(min(max(centre_x - side / 2, 0), width - side)))
    top = int(round(min(max(centre_y - side / 2, 0), height - side)))
    return top, left, side


class FaceDetector(abc.ABC):
    """``detect(rgb)`` on an (H, W, 3) uint8 RGB image -> face boxes ``(x, y, w, h)``, largest first."""

    @staticmethod
    def check_image(rgb: np.ndarray) -> None:
        if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError("rgb must be an (H, W, 3) uint8 array")

    @abc.abstractmethod
    def detect(self, rgb: np.ndarray) -> list[Box]: ...


@dataclass
class Detection:
    """A face: ``box`` (x0, y0, x1, y1) and ``landmarks`` (5, 2) in pixels (eyes, nose, mouth corners, each left to
    right in the image), ``score``."""

    box: np.ndarray
    landmarks: np.ndarray
    score: float

    def xywh(self) -> Box:
        x0, y0, x1, y1 = self.box
        return int(round(x0)), int(round(y0)), int(round(x1 - x0)), int(round(y1 - y0))


class LandmarkFaceDetector(FaceDetector):
    """A detector that also finds five landmarks per face (:meth:`detect_faces`); faces can then be aligned."""

    @abc.abstractmethod
    def detect_faces(self, rgb: np.ndarray) -> list[Detection]: ...

    def detect(self, rgb: np.ndarray) -> list[Box]:
        faces = sorted(self.detect_faces(rgb), key=lambda d: -(d.box[2] - d.box[0]) * (d.box[3] - d.box[1]))
        return [face.xywh() for face in faces]


class HaarFaceDetector(FaceDetector):
    """OpenCV's ``haarcascade_frontalface_default.xml`` (shipped in the opencv-python wheel).

    ``min_size`` is the smallest face side in pixels; the default suits faces in low-resolution photos.
    """

    def __init__(self, min_size: int = 24, scale_factor: float = 1.1, min_neighbors: int = 5) -> None:
        import cv2

        self.cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
        if self.cascade.empty():
            raise RuntimeError("OpenCV's haarcascade_frontalface_default.xml could not be loaded")
        self.min_size = int(min_size)
        self.scale_factor = float(scale_factor)
        self.min_neighbors = int(min_neighbors)

    def detect(self, rgb: np.ndarray) -> list[Box]:
        import cv2

        self.check_image(rgb)
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        boxes = self.cascade.detectMultiScale(
            gray, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors,
            minSize=(self.min_size, self.min_size),
        )
        return sorted((tuple(int(v) for v in box) for box in boxes), key=lambda b: -b[2] * b[3])


def detect_faces(rgb: np.ndarray, min_size: int = 48) -> list[Box]:
    """Frontal faces in an (H, W, 3) uint8 RGB image with the Haar cascade, largest first."""
    return HaarFaceDetector(min_size=min_size).detect(rgb)


def check_detector_spec(spec: str) -> tuple[str, str]:
    """(kind, path) of a ``--detector`` value, without loading anything; ValueError naming what is wrong."""
    kind, sep, path = spec.partition(":")
    if (kind in ("auto", "haar") and not sep) or (kind == "mtcnn" and (not sep or path)) or \
            (kind == "retinaface" and path):
        if path and not os.path.isfile(path):
            raise ValueError(f"--detector weights {path!r} are not a file")
        return kind, path
    raise ValueError(f"--detector must be auto, haar, mtcnn, mtcnn:PATH or retinaface:PATH, got {spec!r}")


def load_detector(spec: str, device="cpu", min_face: int | None = None, template: str = "gfpgan",
                  threshold: float | None = None) -> FaceDetector:
    """The detector a ``--detector`` value names (see :data:`DETECTOR_HELP`); ``min_face`` is the smallest face side
    in pixels (None: each detector's default, 24 for Haar, 20 for MTCNN). RetinaFace runs the post-processing of the
    pipeline whose ``template`` is in use (``gfpgan``: facexlib's, score > 0.97; ``gpen``: GPEN's and MetaF2N's,
    score > 0.9); ``threshold`` overrides its score threshold. Raises ValueError naming what is wrong."""
    kind, path = check_detector_spec(spec)
    if min_face is not None and not min_face >= 1:
        raise ValueError(f"the smallest face side must be >= 1 pixel, got {min_face}")
    if kind == "auto":
        from metaf2n.weights import MTCNN_FILE, cache_root

        if (cache_root() / MTCNN_FILE).is_file():
            kind = "mtcnn"
        else:
            logger.warning("no MTCNN weights in %s: detecting faces with the Haar cascade (square crops, no "
                           "landmarks); run `python -m metaf2n.weights mtcnn` once for MTCNN", cache_root())
            kind = "haar"
    if kind == "haar":
        return HaarFaceDetector() if min_face is None else HaarFaceDetector(min_size=min_face)
    if kind == "mtcnn":
        from metaf2n.faces.mtcnn import MTCNNDetector

        try:
            options = {} if min_face is None else {"min_face_size": min_face}
            return MTCNNDetector(path or None, device, **options)
        except FileNotFoundError as error:
            raise ValueError(str(error)) from None
    from metaf2n.faces.retinaface import RetinaFaceDetector

    return RetinaFaceDetector(path, device, threshold, recipe="gpen" if template == "gpen" else "facexlib")
