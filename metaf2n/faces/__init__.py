"""Faces in real photos: detection behind a small interface, and the square boxes cut around them."""

from metaf2n.faces.detect import FaceDetector, HaarFaceDetector, detect_faces, square_around

__all__ = ["FaceDetector", "HaarFaceDetector", "detect_faces", "square_around"]
