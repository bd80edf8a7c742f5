"""Faces in real photos: detection (Haar, RetinaFace, MTCNN), five-point FFHQ alignment, and the GFPGAN / GPEN restorers
loading their released weights."""

from metaf2n.faces.align import alignment, paste_face, template_alignment, warp_face
from metaf2n.faces.detect import (
    Detection,
    FaceDetector,
    HaarFaceDetector,
    LandmarkFaceDetector,
    detect_faces,
    square_around,
)
from metaf2n.faces.gfpgan import GFPGANv1Clean
from metaf2n.faces.gpen import GPEN
from metaf2n.faces.restorers import NetworkRestorer, load_restorer
from metaf2n.faces.mtcnn import MTCNNDetector
from metaf2n.faces.retinaface import RetinaFace, RetinaFaceDetector

__all__ = [
    "Detection",
    "FaceDetector",
    "GFPGANv1Clean",
    "GPEN",
    "HaarFaceDetector",
    "LandmarkFaceDetector",
    "MTCNNDetector",
    "NetworkRestorer",
    "RetinaFace",
    "RetinaFaceDetector",
    "alignment",
    "detect_faces",
    "load_restorer",
    "paste_face",
    "square_around",
    "template_alignment",
    "warp_face",
]
