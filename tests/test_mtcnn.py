"""MTCNN (metaf2n.faces.mtcnn) and ``python -m metaf2n.weights mtcnn``.

The oracle is facenet-pytorch 2.6.0's own ``MTCNN(...).detect(img, landmarks=True)``, installed ``--no-deps`` by
scripts/test.sh (its pins ask for torch < 2.3 and numpy < 2; its module imports and runs with ours, and needs only
``requests`` besides). The stage rules are also checked against hand-computed values."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import pypi_archive
from metaf2n import infer as infer_cli
from metaf2n import weights
from metaf2n.faces.detect import load_detector
from metaf2n.faces.mtcnn import MTCNNDetector, crops, nms_min, pyramid_scales, regress, square
from metaf2n.io import read_jsonl



@pytest.fixture(scope="session")
def mtcnn_wheel(tmp_path_factory) -> Path:
    """The facenet-pytorch wheel from PyPI."""
    return pypi_archive(tmp_path_factory, weights.MTCNN_REQUIREMENT, weights.MTCNN_WHEEL, wheel=True)


@pytest.fixture(scope="session")
def mtcnn_file(mtcnn_wheel, tmp_path_factory) -> Path:
    return weights.fetch_mtcnn(cache=tmp_path_factory.mktemp("cache"), wheel=mtcnn_wheel)


@pytest.fixture(scope="session")
def detector(mtcnn_file) -> MTCNNDetector:
    return MTCNNDetector(mtcnn_file)


@pytest.fixture(scope="session")
def official():
    facenet = pytest.importorskip("facenet_pytorch")
    return facenet.MTCNN(keep_all=True)


def real_photos(tmp_path_factory) -> dict[str, np.ndarray]:
    """scikit-image's astronaut (whole and shrunk), two photos without a face, the demo set's faces, and a
    synthetic test set (faces composited into photos and degraded) at LQ and GT size."""
    import skimage.data

    from metaf2n.data.demo import build_demo_set
    from metaf2n.data.make_testset import make_testset

    astronaut = skimage.data.astronaut()
    photos = {"astronaut": astronaut, "coffee": skimage.data.coffee(), "chelsea": skimage.data.chelsea(),
              "astronaut_small": np.asarray(Image.fromarray(astronaut).resize((160, 160), Image.BICUBIC))}
    faces, _ = build_demo_set()
    for path in sorted(Path(faces).glob("*.png"))[:4]:
        photos[f"demo_{path.stem}"] = np.asarray(Image.open(path).convert("RGB"))
    testset = make_testset(tmp_path_factory.mktemp("mtcnn") / "set", "iid", count=3, seed=0, progress=False)
    for folder in ("LQ", "GT"):
        for path in sorted((testset / folder).glob("*.png")):
            photos[f"{folder}_{path.stem}"] = np.asarray(Image.open(path).convert("RGB"))
    return photos


def test_detections_equal_facenet_pytorch_on_real_photos(detector, official, tmp_path_factory):
    faces = 0
    for name, rgb in real_photos(tmp_path_factory).items():
        boxes, probs, points = official.detect(rgb, landmarks=True)
        ours = detector.detect_faces(rgb)
        if boxes is None:
            assert ours == [], name
            continue
        assert len(ours) == len(boxes), name
        boxes, probs, points = (np.asarray(a, dtype=np.float64) for a in (boxes, probs, points))
        np.testing.assert_allclose(np.stack([d.box for d in ours]), boxes, atol=1.0, rtol=0, err_msg=name)
        np.testing.assert_allclose(np.stack([d.landmarks for d in ours]), points, atol=1.0, rtol=0, err_msg=name)
        np.testing.assert_allclose([d.score for d in ours], probs, atol=1e-4, rtol=0, err_msg=name)
        faces += len(ours)
    assert faces >= 10  # the photos hold faces to compare, not just empty results


def test_the_astronauts_face_and_landmarks_are_where_a_person_sees_them(detector):
    import skimage.data

    (face,) = detector.detect_faces(skimage.data.astronaut())
    x0, y0, x1, y1 = face.box
    assert 170 < x0 < 195 and 50 < y0 < 80 and 255 < x1 < 280 and 160 < y1 < 185 and face.score > 0.99
    left_eye, right_eye, nose, mouth_left, mouth_right = face.landmarks
    assert left_eye[0] < nose[0] < right_eye[0] and mouth_left[0] < mouth_right[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1])


def test_pyramid_scales_follow_the_factor_down_to_12_pixels():
    # 12 / 20 = 0.6 scales a 100-pixel side to 60; each level multiplies by 0.709 while the side stays >= 12
    scales = pyramid_scales(100, 140, 20, 0.709)
    expected, side = [], 100 * 0.6
    while side >= 12:
        expected.append(0.6 * 0.709 ** len(expected))
        side *= 0.709
    assert len(scales) == len(expected) == 5 and np.allclose(scales, expected, rtol=1e-12)
    assert pyramid_scales(19, 500, 20, 0.709) == []  # 19 * 0.6 < 12: nothing to look at


def test_square_regress_and_crop_conventions():
    box = torch.tensor([[10.0, 20.0, 30.0, 60.0, 0.9]])
    # a 20 x 40 box becomes the 40 x 40 square on the same centre (20, 40)
    assert square(box).tolist() == [[0.0, 20.0, 40.0, 60.0, pytest.approx(0.9)]]
    # widths count whole pixels: 21 x 41, so offsets of (0.1, 0.1, -0.1, 0) move the corners by 2.1, 4.1, -2.1, 0
    moved = regress(box, torch.tensor([[0.1, 0.1, -0.1, 0.0]]))
    assert moved[0, :4].tolist() == pytest.approx([12.1, 24.1, 27.9, 60.0])
    image = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2 * 3, 8, 8)[None, :3]
    # corners truncate to int and read 1-based, clamped to the image: (-3.7, 2.2) -> column 0, row 1
    patches, valid = crops(image, torch.tensor([[-3.7, 2.2, 4.9, 5.0], [20.0, 20.0, 30.0, 30.0]]), 2)
    assert valid.tolist() == [True, False] and patches.shape == (1, 3, 2, 2)
    region = image[..., 1:5, 0:4]  # rows 2..5 and columns 1..4, 1-based
    torch.testing.assert_close(patches[0], torch.nn.functional.avg_pool2d(region, 2)[0])


def test_final_nms_uses_the_smaller_area_and_whole_pixels():
    boxes = np.array([[0, 0, 9, 9], [0, 0, 19, 19], [30, 30, 39, 39]], np.float32)
    scores = np.array([0.8, 0.9, 0.7], np.float32)
    # the small box lies inside the big one: IoU is 100 / 400 = 0.25, but intersection / smaller area is 1 > 0.7
    assert nms_min(boxes, scores, 0.7).tolist() == [1, 2]
    touching = np.array([[0, 0, 9, 9], [9, 0, 18, 9]], np.float32)  # share one column of 10 pixels: 10 / 100
    assert nms_min(touching, np.array([0.9, 0.8], np.float32), 0.09).tolist() == [0]
    assert nms_min(touching, np.array([0.9, 0.8], np.float32), 0.1).tolist() == [0, 1]


def test_bad_weights_and_settings_are_refused(mtcnn_file, tmp_path):
    torch.save({"pnet": {}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"is not an MTCNN weight file \(expected the keys \('pnet', 'rnet', "):
        MTCNNDetector(tmp_path / "other.pth")
    state = torch.load(mtcnn_file, weights_only=True)
    state["onet"].pop("dense6_3.bias")
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"onet does not match MTCNN's onet"):
        MTCNNDetector(tmp_path / "broken.pth")
    for kwargs, message in (({"min_face_size": 0}, "min_face_size"), ({"thresholds": (0.6, 0.7)}, "thresholds"),
                            ({"factor": 1.0}, "factor")):
        with pytest.raises(ValueError, match=message):
            MTCNNDetector(mtcnn_file, **kwargs)
    with pytest.raises(ValueError, match=r"rgb must be an \(H, W, 3\) uint8 array"):
        MTCNNDetector(mtcnn_file).detect_faces(np.zeros((8, 8), np.uint8))


def test_auto_detector_is_mtcnn_when_cached_else_haar_with_the_command(mtcnn_file, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("METAF2N_CACHE", str(mtcnn_file.parent))
    assert type(load_detector("auto")).__name__ == "MTCNNDetector"
    assert load_detector("mtcnn", min_face=40).min_face_size == 40
    monkeypatch.setenv("METAF2N_CACHE", str(tmp_path))
    assert type(load_detector("auto")).__name__ == "HaarFaceDetector"
    assert "run `python -m metaf2n.weights mtcnn` once" in caplog.text
    with pytest.raises(ValueError, match=r"no MTCNN weights at .*run `python -m metaf2n.weights mtcnn`"):
        load_detector("mtcnn")


def test_infer_adapts_through_mtcnn_landmarks(mtcnn_file, checkpoint, restorer_file, tmp_path):
    import skimage.data

    small = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((128, 128), Image.BICUBIC))
    Image.fromarray(small).save(tmp_path / "photo.png")
    out = tmp_path / "out"
    code = infer_cli.main([str(tmp_path / "photo.png"), "-o", str(out), "--checkpoint", str(checkpoint),
                           "--detector", f"mtcnn:{mtcnn_file}", "--restorer", str(restorer_file),
                           "--restorer-range", "-1,1", "--restorer-size", "64", "--face-preview", "--quiet",
                           "--face-recipe", "aligned"])
    assert code == 0
    (record,) = read_jsonl(out / "summary.jsonl")
    assert record["faces_found"] == 1 and record["faces_used"] == 1 and record["adapted"]
    assert Image.open(out / record["face_preview"]).size == (512, 512)


def test_make_testset_cuts_faces_with_mtcnn(mtcnn_file, tmp_path):
    from metaf2n.data.make_testset import main as make_testset_main

    assert make_testset_main(["-o", str(tmp_path / "set"), "--count", "2", "--detector", f"mtcnn:{mtcnn_file}",
                              "--quiet"]) == 0
    manifest = json.loads((tmp_path / "set" / "manifest.json").read_text())
    # the degraded 128-pixel photo 0001 hides its face from MTCNN (facenet-pytorch finds none either)
    assert manifest["face_source"] == "detected and aligned" and manifest["not_detected"] == ["0001"]
    lq = np.asarray(Image.open(tmp_path / "set" / "Face_LQ" / "0000.png"), np.float64)
    hq = np.asarray(Image.open(tmp_path / "set" / "Face_HQ" / "0000.png").resize((128, 128), Image.BOX), np.float64)
    # the LQ face and the GT face are the same alignment: the GT shrunk x4 resembles the degraded LQ face
    assert lq.shape == (128, 128, 3) and np.corrcoef(lq.ravel(), hq.ravel())[0, 1] > 0.8


def test_weights_command_caches_mtcnn_and_names_a_bad_wheel(mtcnn_wheel, tmp_path, capsys):
    assert weights.main(["mtcnn", "--wheel", str(mtcnn_wheel), "--cache", str(tmp_path)]) == 0
    state = torch.load(tmp_path / weights.MTCNN_FILE, weights_only=True)
    assert sum(v.numel() for v in state["pnet"].values()) == 6632
    assert sum(v.numel() for v in state["rnet"].values()) == 100178
    assert sum(v.numel() for v in state["onet"].values()) == 389040
    (tmp_path / "bad.whl").write_bytes(b"not a zip")
    assert weights.main(["mtcnn", "--wheel", str(tmp_path / "bad.whl"), "--cache", str(tmp_path / "other")]) == 1
    assert "bad.whl' is not a wheel" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_a_file_that_is_not_mtcnn_weights_gets_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(ValueError, match=r"MTCNN weights .*notes.txt. cannot be read: not a torch file"):
        MTCNNDetector(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match=r"MTCNN weights .*notes.txt. cannot be read: not a torch file"):
        load_detector(f"mtcnn:{tmp_path / 'notes.txt'}")
