"""Faces in real photos: detection (Haar, RetinaFace), five-point FFHQ alignment, and the GFPGAN / GPEN restorers
loading their released weights."""

from metaf2n.faces.align import alignment, paste_face, template_alignment, warp_face
from metaf2n.faces.detect import FaceDetector, HaarFaceDetector, detect_faces, square_around
from metaf2n.faces.gfpgan import GFPGANv1Clean
from metaf2n.faces.gpen import GPEN
from metaf2n.faces.restorers import NetworkRestorer, load_restorer
from metaf2n.faces.retinaface import Detection, RetinaFace, RetinaFaceDetector

__all__ = [
    "Detection",
    "FaceDetector",
    "GFPGANv1Clean",
    "GPEN",
    "HaarFaceDetector",
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
