"""Five-point face alignment to the FFHQ templates of the face restorers, and pasting a face back.

Landmarks are (5, 2) pixel coordinates: left eye, right eye, nose, left and right mouth corners (RetinaFace's order).
Templates are given for 512 px faces and scaled to the restorer's size:

* :data:`GFPGAN_TEMPLATE_512` (GFPGAN / facexlib), fitted with a partial-affine (similarity) LMEDS estimate;
* :data:`GPEN_TEMPLATE_512` (GPEN's face-enhancement code), fitted with a least-squares similarity transform.

An affine here is the (2, 3) matrix mapping photo pixels to face pixels (OpenCV's convention for ``warpAffine``).
"""

from __future__ import annotations

import cv2
import numpy as np

GFPGAN_TEMPLATE_512 = np.array(
    [[192.98, 239.95], [318.90, 240.19], [256.63, 314.02], [201.26, 371.41], [313.09, 371.15]], dtype=np.float64
)
GPEN_TEMPLATE_512 = np.array(
    [[202.04, 242.88], [309.43, 242.29], [256.08, 303.96], [211.96, 366.83], [300.89, 366.34]], dtype=np.float64
)
FITS = ("lmeds", "least_squares")
TEMPLATES = {"gfpgan": (GFPGAN_TEMPLATE_512, "lmeds"), "gpen": (GPEN_TEMPLATE_512, "least_squares")}
BORDER_VALUE = (135, 133, 132)  # facexlib's grey outside the photo


def _check_points(points: np.ndarray, name: str) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    if points.shape != (5, 2) or not np.isfinite(points).all():
        raise ValueError(f"{name} must be five finite (x, y) points, shape (5, 2); got {points.shape}")
    return points


def similarity_least_squares(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The (2, 3) similarity (rotation, uniform scale, shift) minimising the squared error source -> target
    (Umeyama's closed form, no reflection)."""
    mu_s, mu_t = source.mean(0), target.mean(0)
    s, t = source - mu_s, target - mu_t
    cov = t.T @ s / len(source)
    u, sigma, vt = np.linalg.svd(cov)
    d = np.diag([1.0, np.sign(np.linalg.det(u @ vt))])
    rotation = u @ d @ vt
    scale = np.trace(np.diag(sigma) @ d) / (s**2).sum(1).mean()
    shift = mu_t - scale * rotation @ mu_s
    return np.hstack([scale * rotation, shift[:, None]])


def alignment(landmarks: np.ndarray, template_512: np.ndarray = GFPGAN_TEMPLATE_512, size: int = 512,
              fit: str = "lmeds") -> np.ndarray:
    """The affine mapping the photo's ``landmarks`` onto ``template_512`` scaled to a ``size`` face."""
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    source = _check_points(landmarks, "landmarks")
    target = _check_points(template_512, "template_512") * (size / 512.0)
    if fit == "least_squares":
        return similarity_least_squares(source, target)
    affine, _ = cv2.estimateAffinePartial2D(source, target, method=cv2.LMEDS)
    if affine is None:
        raise ValueError("the landmarks are degenerate: no similarity transform fits them")
    return affine


def template_alignment(landmarks: np.ndarray, template: str = "gfpgan", size: int = 512) -> np.ndarray:
    """:func:`alignment` onto a restorer's template by name: ``"gfpgan"`` (LMEDS) or ``"gpen"`` (least squares)."""
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {tuple(TEMPLATES)}, got {template!r}")
    points, fit = TEMPLATES[template]
    return alignment(landmarks, points, size, fit)


def scaled(affine: np.ndarray, factor: float) -> np.ndarray:
    """The affine onto a face ``factor`` times the size (e.g. 1/4: the LQ face of a 4x smaller crop)."""
    return np.asarray(affine, dtype=np.float64) * factor


def warp_face(image: np.ndarray, affine: np.ndarray, size: int) -> np.ndarray:
    """The ``size`` x ``size`` aligned face of ``image`` (H, W, 3), bicubic, grey outside the photo."""
    return cv2.warpAffine(image, np.asarray(affine, dtype=np.float64), (size, size), flags=cv2.INTER_CUBIC,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=BORDER_VALUE)


def feather(size: int, width: int) -> np.ndarray:
    """(size, size) float32 weights: 1 inside, ramping linearly to 0 over ``width`` pixels at the border."""
    ramp = np.ones(size, dtype=np.float32)
    if width > 0:
        edge = (np.arange(width, dtype=np.float32) + 0.5) / width
        ramp[:width] = edge
        ramp[-width:] = edge[::-1]
    return np.outer(ramp, ramp)


def paste_face(image: np.ndarray, face: np.ndarray, affine: np.ndarray, feather_fraction: float = 1 / 16) -> np.ndarray:
    """``image`` (H, W, 3) with ``face`` (s, s, 3), aligned by ``affine`` (image -> face), warped back and blended
    with a feathered mask. Both uint8 or both float; returns the dtype of ``image``."""
    size = face.shape[0]
    height, width = image.shape[:2]
    inverse = cv2.invertAffineTransform(np.asarray(affine, dtype=np.float64))
    back = cv2.warpAffine(face.astype(np.float32), inverse, (width, height), flags=cv2.INTER_CUBIC)
    mask = cv2.warpAffine(feather(size, max(1, int(size * feather_fraction))), inverse, (width, height),
                          flags=cv2.INTER_LINEAR)[..., None]
    out = mask * back + (1 - mask) * image.astype(np.float32)
    if image.dtype == np.uint8:
        return np.clip(out + 0.5, 0, 255).astype(np.uint8)
    return out.astype(image.dtype)
