"""Face fidelity: the official crops, RetinaFace's official post-processing, and MetaF2N's face-pair generator
(metaf2n.faces.align, metaf2n.faces.retinaface, metaf2n.data.face_pairs).

The official behaviour is written out here from the official code's description (facexlib 0.3.0's
FaceRestoreHelper and RetinaFace, GPEN's align_faces.py and retinaface_detection.py, MetaF2N's
generate_test_faces.py), with OpenCV and scikit-image doing the arithmetic, not our code."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from skimage.transform import SimilarityTransform

from metaf2n import infer as infer_cli
from metaf2n.data import face_pairs as face_pairs_cli
from metaf2n.faces.align import (
    GFPGAN_TEMPLATE_512,
    GPEN_TEMPLATE_512,
    paste_face,
    template_alignment,
    warp_face,
)
from metaf2n.faces.detect import load_detector
from metaf2n.faces.restorers import load_restorer
from metaf2n.faces.retinaface import RetinaFaceDetector, nms_plus_one, prior_boxes
from metaf2n.io import read_jsonl
from test_faces import _one_face_level, _tiny, released_file

# facexlib 0.3.0, face_restoration_helper.py: the 512 template
FACEXLIB_TEMPLATE = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                              [201.26117, 371.41043], [313.08905, 371.15118]])
# GPEN align_faces.py: REFERENCE_FACIAL_POINTS on a 96 x 112 crop; for output 512, inner padding 0.25, outer (0, 0),
# default square: x + 8 (square 112), + 28 each (padding 56 in all, crop 168), times 512 / 168, cast to float32
GPEN_REFERENCE = np.array([[30.29459953, 51.69630051], [65.53179932, 51.50139999], [48.02519989, 71.73660278],
                           [33.54930115, 92.3655014], [62.72990036, 92.20410156]])
GPEN_512 = ((GPEN_REFERENCE + [8, 0] + 28) * (512 / 168)).astype(np.float32)


def umeyama(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """scikit-image's similarity estimate (the Umeyama code GPEN carries a copy of), as a (2, 3) affine."""
    if hasattr(SimilarityTransform, "from_estimate"):
        return SimilarityTransform.from_estimate(source, target).params[:2]
    transform = SimilarityTransform()
    assert transform.estimate(source, target)
    return transform.params[:2]


@pytest.fixture(scope="module")
def photo_and_landmarks():
    """scikit-image's astronaut, cropped so the face nears the left border (the grey/black fill shows), with
    landmarks placed by hand on her eyes, nose and mouth corners."""
    import skimage.data

    rgb = np.ascontiguousarray(skimage.data.astronaut()[20:300, 150:430])
    landmarks = np.array([[55.3, 82.1], [96.8, 83.6], [74.9, 108.2], [52.0, 119.4], [95.2, 121.7]])
    return rgb, landmarks


def test_templates_have_the_official_digits():
    np.testing.assert_array_equal(GFPGAN_TEMPLATE_512, FACEXLIB_TEMPLATE)
    np.testing.assert_array_equal(GPEN_TEMPLATE_512, GPEN_512.astype(np.float64))
    np.testing.assert_allclose(GPEN_512[0], [202.04068, 242.88396], atol=1e-5)


def test_gfpgan_crop_equals_facexlibs_warp(photo_and_landmarks):
    rgb, landmarks = photo_and_landmarks
    # facexlib: estimateAffinePartial2D(landmarks, template, LMEDS), then warpAffine of the BGR image with no
    # interpolation flag (bilinear) and borderValue (135, 133, 132) in BGR
    affine = cv2.estimateAffinePartial2D(landmarks, FACEXLIB_TEMPLATE, method=cv2.LMEDS)[0]
    expected_bgr = cv2.warpAffine(np.ascontiguousarray(rgb[..., ::-1]), affine, (512, 512),
                                  borderMode=cv2.BORDER_CONSTANT, borderValue=(135, 133, 132))
    expected = expected_bgr[..., ::-1]
    ours_affine = template_alignment(landmarks, "gfpgan", 512)
    np.testing.assert_allclose(ours_affine, affine, atol=1e-9)
    ours = warp_face(rgb, ours_affine, 512, "gfpgan")
    assert np.abs(ours.astype(int) - expected.astype(int)).max() <= 1
    outside = np.all(expected == expected[0, 0], axis=-1)
    assert outside.sum() > 1000 and tuple(ours[0, 0]) == (132, 133, 135)  # grey, in RGB order


def test_gpen_crop_equals_gpens_warp_and_crop_face(photo_and_landmarks):
    rgb, landmarks = photo_and_landmarks
    # GPEN: a similarity (Umeyama, as scikit-image's) onto the float32 reference points; warpAffine flags=3
    # (INTER_AREA, bilinear in warpAffine), black border
    tfm = umeyama(landmarks.astype(np.float32), GPEN_512)
    expected = cv2.warpAffine(rgb, tfm, (512, 512), flags=3)
    ours_affine = template_alignment(landmarks, "gpen", 512)
    np.testing.assert_allclose(ours_affine, tfm, atol=1e-4)
    ours = warp_face(rgb, ours_affine, 512, "gpen")
    assert np.abs(ours.astype(int) - expected.astype(int)).max() <= 1
    assert tuple(ours[0, 0]) == (0, 0, 0)


def test_paste_back_is_bilinear(photo_and_landmarks):
    rgb, landmarks = photo_and_landmarks
    affine = template_alignment(landmarks, "gfpgan", 512)
    face = np.full((512, 512, 3), 200, np.uint8)
    face[:, ::2] = 40  # stripes one pixel wide: cubic overshoots below 40 and above 200, bilinear cannot
    out = paste_face(np.full_like(rgb, 120), face, affine, feather_fraction=1 / 4)
    inverse = cv2.invertAffineTransform(affine)
    centre = (inverse @ np.array([256, 256, 1.0])).astype(int)
    region = out[centre[1] - 10 : centre[1] + 10, centre[0] - 10 : centre[0] + 10]
    assert region.min() >= 40 and region.max() <= 200


def test_plus_one_nms_counts_whole_pixels():
    boxes = np.array([[0, 0, 9, 9], [5, 0, 14, 9], [40, 40, 49, 49]], np.float32)
    scores = np.array([0.9, 0.95, 0.8], np.float32)
    # with whole pixels the overlap of the first two is 50 / 150 = 0.33 (without: 36 / 126 = 0.29)
    assert nms_plus_one(boxes, scores, 0.3) == [1, 2]
    assert nms_plus_one(boxes, scores, 0.34) == [1, 0, 2]


def _crafted_detector(tmp_path, scores: dict[int, float], recipe="facexlib", shift=None) -> RetinaFaceDetector:
    """A RetinaFace whose network is replaced by fixed outputs: priors ``scores`` keys get those face scores;
    ``shift`` = (prior, dx) moves that prior's box by ``dx`` box offsets."""
    detector = RetinaFaceDetector(released_file(tmp_path, "mobilenet0.25", _one_face_level), recipe=recipe,
                                  score_threshold=0.5)
    count = prior_boxes(64, 64).shape[0]
    conf = torch.zeros(1, count, 2)
    conf[0, :, 0] = 1
    for index, score in scores.items():
        conf[0, index] = torch.tensor([1 - score, score])
    loc = torch.zeros(1, count, 4)
    if shift is not None:
        loc[0, shift[0], 0] = shift[1]
    detector.model = lambda x: (loc, conf, torch.zeros(1, count, 10))
    return detector


def test_tied_scores_keep_the_candidate_facexlib_puts_first(tmp_path):
    """facexlib sorts with ``scores.argsort()[::-1]`` before NMS: of two exactly tied, overlapping candidates the
    one later in prior order comes first and is kept."""
    priors = prior_boxes(64, 64)
    first, second = 0, 2  # neighbouring stride-8 cells (centres 8 px apart), both 16 px priors
    assert torch.equal(priors[first, 2:], priors[second, 2:])
    # move the second 4 px towards the first (offset -2.5 x 0.1 x 16 px): IoU 192 / 320 = 0.6 > 0.4
    detector = _crafted_detector(tmp_path, {first: 0.99, second: 0.99}, shift=(second, -2.5))
    (face,) = detector.detect_faces(np.zeros((64, 64, 3), np.uint8))
    centre = (face.box[:2] + face.box[2:]) / 2
    np.testing.assert_allclose(centre, [8.0, 4.0], atol=1e-4)  # the second's centre: (12 - 4, 4)


def test_thresholds_follow_the_pipeline_in_use(tmp_path):
    path = released_file(tmp_path, "mobilenet0.25", _one_face_level)
    assert load_detector(f"retinaface:{path}", template="gfpgan").score_threshold == 0.97
    assert load_detector(f"retinaface:{path}", template="gpen").score_threshold == 0.9
    assert load_detector(f"retinaface:{path}", template="gpen", threshold=0.5).score_threshold == 0.5
    detector = _crafted_detector(tmp_path, {0: 0.95, 40: 0.98}, recipe="facexlib")
    detector.score_threshold = 0.97  # facexlib's get_face_landmarks_5
    assert len(detector.detect_faces(np.zeros((64, 64, 3), np.uint8))) == 1


def test_gpen_recipe_shrinks_large_photos_and_divides_back(tmp_path):
    detector = RetinaFaceDetector(released_file(tmp_path, "mobilenet0.25", _one_face_level), recipe="gpen")
    seen = []
    real = detector.model
    detector.model = lambda x: seen.append(tuple(x.shape[-2:])) or real(x)
    faces = detector.detect_faces(np.full((400, 1600, 3), 128, np.uint8))
    assert seen == [(250, 1000)]  # 1000 / 1600 of each side
    assert faces and max(f.box[2] for f in faces) > 1000  # boxes back in the photo's pixels
    assert max(f.landmarks[:, 0].max() for f in faces) > 1000 and max(f.landmarks[:, 1].max() for f in faces) > 250
    # GPEN divides the score column by the factor too: confident faces score above 1 (up to 1.6)
    assert 1 < max(f.score for f in faces) <= 1.6


# --- MetaF2N's face pairs ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair_setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    detector_path = released_file(folder, "mobilenet0.25", _one_face_level)
    restorer_path = folder / "gpen.pth"
    torch.save({"params_ema": _tiny("gpen").state_dict()}, restorer_path)
    import skimage.data

    lq_dir = folder / "LQ"
    lq_dir.mkdir()
    photo = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((96, 80), Image.BICUBIC))
    Image.fromarray(photo).save(lq_dir / "p.png")
    return folder, detector_path, restorer_path, photo


def gpen_inverse(landmarks: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """GPEN's tfm_inv: the reference points fitted back onto the landmarks (a least-squares rotation) at the inverse
    of the forward fit's scale, in float32 points."""
    source, target = landmarks.astype(np.float32), reference.astype(np.float32)
    forward_scale = np.linalg.svd((target - target.mean(0)).T @ (source - source.mean(0)) / 5)[1].sum() / \
        (source - source.mean(0)).var(axis=0).sum()
    a, b = target - target.mean(0), source - source.mean(0)
    u, _, vt = np.linalg.svd(b.T @ a / 5)
    rotation = u @ vt
    scale = 1 / forward_scale
    shift = source.mean(0) - scale * rotation @ target.mean(0)
    return np.hstack([scale * rotation, shift[:, None]])


def expected_pairs(photo, detector, restorer):
    """The generator's recipe step by step, with OpenCV and scikit-image."""
    height, width = photo.shape[:2]
    bgr = np.ascontiguousarray(photo[..., ::-1])
    pairs = {}
    for i, face in enumerate(detector.detect_faces(photo)):
        if face.score < 0.9:
            continue
        x0, y0, x1, y1 = (int(v) for v in face.box)
        x0, y0 = max(x0, 0), max(y0, 0)
        tfm = umeyama(face.landmarks.astype(np.int32).astype(np.float32), GPEN_512)
        crop = cv2.warpAffine(bgr, tfm, (512, 512), flags=3)
        x = torch.from_numpy(crop[..., ::-1].astype(np.float32) / 255).permute(2, 0, 1)[None]
        restored = (restorer(x)[0].permute(1, 2, 0).numpy().clip(0, 1) * 255).astype(np.uint8)[..., ::-1]
        inverse = gpen_inverse(face.landmarks.astype(np.int32), GPEN_512)
        np.testing.assert_allclose(inverse, cv2.invertAffineTransform(tfm), atol=1e-3)
        canvas = cv2.warpAffine(restored, inverse * 4, (4 * width, 4 * height), flags=3)
        lq = bgr[y0 : y1 + 1, x0 : x1 + 1][..., ::-1]
        pairs[i] = (lq, canvas[4 * y0 : 4 * y1 + 4, 4 * x0 : 4 * x1 + 4][..., ::-1])
    return pairs


def test_face_pairs_follow_metaf2ns_generator(pair_setup):
    folder, detector_path, restorer_path, photo = pair_setup
    out = folder / "out"
    assert face_pairs_cli.main([str(folder / "LQ"), "-o", str(out), "--detector", f"retinaface:{detector_path}",
                                "--restorer", f"gpen:{restorer_path}", "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["no_face"] == [] and manifest["photos"] == 1
    detector = load_detector(f"retinaface:{detector_path}", template="gpen")
    expected = expected_pairs(photo, detector, load_restorer(f"gpen:{restorer_path}"))
    assert expected and sorted(p.name for p in (out / "Face_LQ").iterdir()) == sorted(
        f"p_{i}.png" for i in expected)
    for i, (lq, hq) in expected.items():
        ours_lq = np.asarray(Image.open(out / "Face_LQ" / f"p_{i}.png"))
        ours_hq = np.asarray(Image.open(out / "Face_HQ" / f"p_{i}.png"))
        np.testing.assert_array_equal(ours_lq, lq)
        assert ours_hq.shape == (4 * lq.shape[0], 4 * lq.shape[1], 3)
        assert np.abs(ours_hq.astype(int) - hq.astype(int)).max() <= 1
        assert (ours_hq > 0).any()


def test_infer_cuts_the_same_pairs_as_the_generator(pair_setup, checkpoint):
    folder, detector_path, restorer_path, _ = pair_setup
    out = folder / "out_infer"
    common = ["--checkpoint", str(checkpoint), "--quiet", "--seed", "3"]
    assert infer_cli.main([str(folder / "LQ" / "p.png"), "-o", str(out / "own"), "--detector",
                           f"retinaface:{detector_path}", "--restorer", f"gpen:{restorer_path}", *common]) == 0
    pairs = folder / "out"
    assert infer_cli.main([str(folder / "LQ" / "p.png"), "-o", str(out / "files"), "--face-lq",
                           str(pairs / "Face_LQ"), "--face-hq", str(pairs / "Face_HQ"), *common]) == 0
    (own,) = read_jsonl(out / "own" / "summary.jsonl")
    (files,) = read_jsonl(out / "files" / "summary.jsonl")
    assert own["adapted"] and files["adapted"] and own["faces_used"] == files["faces_used"]
    assert own["inner_before"] == pytest.approx(files["inner_before"], rel=1e-5)


def test_photos_without_a_face_are_listed_and_skipped(tmp_path):
    from metaf2n.data.face_pairs import write_face_pairs
    from metaf2n.faces.detect import Detection, LandmarkFaceDetector

    class OnlyBright(LandmarkFaceDetector):
        def detect_faces(self, rgb):
            if rgb.mean() < 10:
                return []
            return [Detection(np.array([4.0, 4.0, 30.0, 30.0]), np.array([[10, 12], [24, 12], [17, 18], [11, 24],
                                                                            [23, 24]], float), 0.95),
                    Detection(np.array([0.0, 0.0, 9.0, 9.0]), np.zeros((5, 2)) + [[1, 2], [8, 2], [5, 5], [2, 8],
                                                                                  [8, 8]], 0.5)]

    (tmp_path / "LQ").mkdir()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "LQ" / "dark.png")
    Image.fromarray(np.full((40, 40, 3), 120, np.uint8)).save(tmp_path / "LQ" / "bright.png")
    restorer = lambda x: x  # noqa: E731  (an identity "restorer")
    manifest = write_face_pairs(tmp_path / "LQ", tmp_path / "out", OnlyBright(), restorer, 0.9, "gpen", False)
    assert manifest["no_face"] == ["dark.png"] and manifest["pairs"] == 1
    # detection 1 scored 0.5 < 0.9: skipped, so only NAME_0 is written (the official numbering keeps gaps)
    assert sorted(p.name for p in (tmp_path / "out" / "Face_LQ").iterdir()) == ["bright_0.png"]
    assert Image.open(tmp_path / "out" / "Face_LQ" / "bright_0.png").size == (27, 27)  # [4 : 30 + 1]
    assert Image.open(tmp_path / "out" / "Face_HQ" / "bright_0.png").size == (108, 108)


def test_make_testset_with_a_restorer_cuts_metaf2ns_pairs(pair_setup, tmp_path):
    from metaf2n.data.make_testset import make_testset

    _, detector_path, restorer_path, _ = pair_setup
    detector = load_detector(f"retinaface:{detector_path}", template="gpen")
    restorer = load_restorer(f"gpen:{restorer_path}")
    out = make_testset(tmp_path / "set", "iid", count=1, seed=0, size=128, face_min=64, face_max=64, progress=False,
                       detector=detector, restorer=restorer, template="gpen")
    lq = np.asarray(Image.open(out / "LQ" / "0000.png"))
    (expected_lq, expected_hq), *_ = expected_pairs(lq, detector, restorer).values()
    np.testing.assert_array_equal(np.asarray(Image.open(out / "Face_LQ" / "0000.png")), expected_lq)
    hq = np.asarray(Image.open(out / "Face_HQ" / "0000.png")).astype(int)
    assert np.abs(hq - expected_hq.astype(int)).max() <= 1


def test_a_folder_without_any_face_still_gets_its_manifest(tmp_path):
    from metaf2n.data.face_pairs import write_face_pairs
    from metaf2n.faces.detect import LandmarkFaceDetector

    class NoFace(LandmarkFaceDetector):
        def detect_faces(self, rgb):
            return []

    (tmp_path / "LQ").mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "LQ" / "dark.png")
    manifest = write_face_pairs(tmp_path / "LQ", tmp_path / "new" / "out", NoFace(), lambda x: x, 0.9, "gpen", False)
    assert manifest["no_face"] == ["dark.png"]
    assert json.loads((tmp_path / "new" / "out" / "manifest.json").read_text())["pairs"] == 0
