"""Five-point face alignment to the FFHQ templates of the face restorers, and pasting a face back.

Landmarks are (5, 2) pixel coordinates: left eye, right eye, nose, left and right mouth corners (RetinaFace's order).
Templates are given for 512 px faces and scaled to the restorer's size:

* :data:`GFPGAN_TEMPLATE_512` (GFPGAN / facexlib), fitted with a partial-affine (similarity) LMEDS estimate, crops
  bilinear with facexlib's grey border;
* :data:`GPEN_TEMPLATE_512` (GPEN's face-enhancement code, computed from its reference points as it does), fitted
  with a least-squares similarity transform (Umeyama), crops bilinear with a black border.

An affine here is the (2, 3) matrix mapping photo pixels to face pixels (OpenCV's convention for ``warpAffine``).
"""

from __future__ import annotations

import cv2
import numpy as np

# facexlib's FaceRestoreHelper template for 512 px faces (GFPGAN), all its digits
GFPGAN_TEMPLATE_512 = np.array(
    [[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935], [201.26117, 371.41043],
     [313.08905, 371.15118]], dtype=np.float64
)
# GPEN's align_faces.py: REFERENCE_FACIAL_POINTS on its 96 x 112 crop
GPEN_REFERENCE_POINTS = np.array(
    [[30.29459953, 51.69630051], [65.53179932, 51.50139999], [48.02519989, 71.73660278], [33.54930115, 92.3655014],
     [62.72990036, 92.20410156]], dtype=np.float64
)
GPEN_CROP_SIZE = (96, 112)


def gpen_reference_points(size: int = 512, inner_padding: float = 0.25) -> np.ndarray:
    """GPEN's ``get_reference_facial_points((size, size), inner_padding, (0, 0), default_square=True)``: the
    96 x 112 points shifted to a 112 x 112 square, padded by ``inner_padding`` of the side on each side
    (``round(112 * inner_padding * 2)`` pixels in all), then scaled to ``size``; float32, as its
    ``warp_and_crop_face`` casts them."""
    crop = np.array(GPEN_CROP_SIZE, dtype=np.int64)
    points = GPEN_REFERENCE_POINTS + (crop.max() - crop) / 2
    crop = np.full(2, crop.max(), dtype=np.int64)
    growth = crop * inner_padding * 2
    points = points + growth / 2
    crop = crop + np.round(growth).astype(np.int64)
    points = points * (np.float32(size) / crop[0])
    return points.astype(np.float32)


GPEN_TEMPLATE_512 = gpen_reference_points(512).astype(np.float64)
FITS = ("lmeds", "least_squares")
TEMPLATES = {"gfpgan": (GFPGAN_TEMPLATE_512, "lmeds"), "gpen": (GPEN_TEMPLATE_512, "least_squares")}
# Outside the photo: facexlib fills (135, 133, 132) in its BGR images, i.e. RGB (132, 133, 135); GPEN fills black.
BORDER_VALUES = {"gfpgan": (132, 133, 135), "gpen": (0, 0, 0)}


def _check_points(points: np.ndarray, name: str) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    if points.shape != (5, 2) or not np.isfinite(points).all():
        raise ValueError(f"{name} must be five finite (x, y) points, shape (5, 2); got {points.shape}")
    return points


def umeyama(source: np.ndarray, target: np.ndarray, scale: float | None = None) -> tuple[np.ndarray, np.floating]:
    """The (2, 3) similarity (rotation, uniform scale, shift) minimising the squared error source -> target
    (Umeyama's closed form, no reflection) and its scale; ``scale`` fixes the scale instead of estimating it.
    Computed in the inputs' dtype and in the order of scikit-image's ``_umeyama``, which GPEN uses on float32 points:
    bilinear ``warpAffine`` reads coordinates in 1/32 pixel steps, so a last-bit difference in the affine can move a
    crop's pixel by several levels at a sharp edge."""
    count = source.shape[0]
    source_mean, target_mean = source.mean(axis=0), target.mean(axis=0)
    source_demean, target_demean = source - source_mean, target - target_mean
    covariance = target_demean.T @ source_demean / count
    signs = np.ones((2,), dtype=np.float64)
    if np.linalg.det(covariance) < 0:
        signs[1] = -1
    u, sigma, vt = np.linalg.svd(covariance)
    transform = np.eye(3, dtype=np.float64)
    transform[:2, :2] = u @ np.diag(signs) @ vt
    if scale is None:
        scale = 1.0 / source_demean.var(axis=0).sum() * (sigma @ signs)
    transform[:2, 2] = target_mean - scale * (transform[:2, :2] @ source_mean.T)
    transform[:2, :2] *= scale
    return transform[:2], scale  # a numpy scalar: 1 / scale then rounds in its dtype, as GPEN's does


def similarity_least_squares(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """:func:`umeyama`'s affine."""
    return umeyama(source, target)[0]


def alignment(landmarks: np.ndarray, template_512: np.ndarray = GFPGAN_TEMPLATE_512, size: int = 512,
              fit: str = "lmeds") -> np.ndarray:
    """The affine mapping the photo's ``landmarks`` onto ``template_512`` scaled to a ``size`` face."""
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    source = _check_points(landmarks, "landmarks")
    target = _check_points(template_512, "template_512") * (size / 512.0)
    if fit == "least_squares":  # GPEN's warp_and_crop_face fits float32 points
        return similarity_least_squares(source.astype(np.float32), target.astype(np.float32))
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


def alignment_and_inverse(landmarks: np.ndarray, template: str = "gfpgan",
                          size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """:func:`template_alignment` and the affine from the aligned face back to the photo, as the ``template``'s
    pipeline computes it: facexlib inverts the fitted affine (``cv2.invertAffineTransform``); GPEN fits the template
    onto the landmarks again with the first fit's scale inverted (float32 points), which agrees with the inverse only
    to the last bits."""
    if template != "gpen":
        affine = template_alignment(landmarks, template, size)
        return affine, cv2.invertAffineTransform(affine)
    points, _ = TEMPLATES[template]
    source = _check_points(landmarks, "landmarks").astype(np.float32)
    target = (_check_points(points, "template_512") * (size / 512.0)).astype(np.float32)
    affine, scale = umeyama(source, target)
    return affine, umeyama(target, source, 1.0 / scale)[0]


def scaled(affine: np.ndarray, factor: float) -> np.ndarray:
    """The affine onto a face ``factor`` times the size (e.g. 1/4: the LQ face of a 4x smaller crop)."""
    return np.asarray(affine, dtype=np.float64) * factor


def warp_face(image: np.ndarray, affine: np.ndarray, size: int, template: str = "gfpgan") -> np.ndarray:
    """The ``size`` x ``size`` aligned face of the RGB ``image`` (H, W, 3), as the ``template``'s pipeline cuts it:
    ``cv2.warpAffine`` with bilinear interpolation (facexlib passes no flag; GPEN's ``flags=3``, INTER_AREA, is
    bilinear in warpAffine) and a constant border of :data:`BORDER_VALUES` [template]."""
    if template not in BORDER_VALUES:
        raise ValueError(f"template must be one of {tuple(BORDER_VALUES)}, got {template!r}")
    return cv2.warpAffine(image, np.asarray(affine, dtype=np.float64), (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=BORDER_VALUES[template])


def feather(size: int, width: int) -> np.ndarray:
    """(size, size) float32 weights: 1 inside, ramping linearly to 0 over ``width`` pixels at the border."""
    ramp = np.ones(size, dtype=np.float32)
    if width > 0:
        edge = (np.arange(width, dtype=np.float32) + 0.5) / width
        ramp[:width] = edge
        ramp[-width:] = edge[::-1]
    return np.outer(ramp, ramp)


def paste_face(image: np.ndarray, face: np.ndarray, affine: np.ndarray, feather_fraction: float = 1 / 16) -> np.ndarray:
    """``image`` (H, W, 3) with ``face`` (s, s, 3), aligned by ``affine`` (image -> face), warped back (bilinear,
    as facexlib and GPEN warp back) and blended with a feathered mask. Both uint8 or both float; returns the dtype of
    ``image``."""
    size = face.shape[0]
    height, width = image.shape[:2]
    inverse = cv2.invertAffineTransform(np.asarray(affine, dtype=np.float64))
    back = cv2.warpAffine(face.astype(np.float32), inverse, (width, height), flags=cv2.INTER_LINEAR)
    mask = cv2.warpAffine(feather(size, max(1, int(size * feather_fraction))), inverse, (width, height),
                          flags=cv2.INTER_LINEAR)[..., None]
    out = mask * back + (1 - mask) * image.astype(np.float32)
    if image.dtype == np.uint8:
        return np.clip(out + 0.5, 0, 255).astype(np.uint8)
    return out.astype(image.dtype)
