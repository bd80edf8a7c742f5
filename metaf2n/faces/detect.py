"""Face detection: the :class:`FaceDetector` interface and OpenCV's frontal-face Haar cascade behind it.

Boxes are ``(x, y, w, h)`` in pixels of the image given; :func:`square_around` turns one into a square crop
``(top, left, side)`` that is ``ratio`` times its larger side, optionally shifted, and moved inside the image.
"""

from __future__ import annotations

import abc

import numpy as np

Box = tuple[int, int, int, int]


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

    @abc.abstractmethod
    def detect(self, rgb: np.ndarray) -> list[Box]: ...


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

        if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError("rgb must be an (H, W, 3) uint8 array")
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        boxes = self.cascade.detectMultiScale(
            gray, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors,
            minSize=(self.min_size, self.min_size),
        )
        return sorted((tuple(int(v) for v in box) for box in boxes), key=lambda b: -b[2] * b[3])


def detect_faces(rgb: np.ndarray, min_size: int = 48) -> list[Box]:
    """Frontal faces in an (H, W, 3) uint8 RGB image with the Haar cascade, largest first."""
    return HaarFaceDetector(min_size=min_size).detect(rgb)
