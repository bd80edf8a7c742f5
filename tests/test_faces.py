"""Faces in real photos: RetinaFace (layout of the released checkpoints, priors, decoding, detection) and five-point
alignment to the FFHQ templates (fit, warp, paste back), and their use by metaf2n.infer."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from metaf2n import infer as infer_cli
from metaf2n.faces.align import (
    GFPGAN_TEMPLATE_512,
    GPEN_TEMPLATE_512,
    alignment,
    paste_face,
    scaled,
    similarity_least_squares,
    warp_face,
)
from metaf2n.faces.retinaface import (
    RetinaFace,
    RetinaFaceDetector,
    decode_boxes,
    decode_landmarks,
    encode_boxes,
    prior_boxes,
)
from metaf2n.io import read_jsonl


# --- the released checkpoints' layouts, written out independently -------------------------------------------------
def _conv_bn_keys(prefix: str, cin: int, cout: int, kernel: int) -> dict[str, tuple]:
    keys = {f"{prefix}.0.weight": (cout, cin, kernel, kernel)}
    for name in ("weight", "bias", "running_mean", "running_var"):
        keys[f"{prefix}.1.{name}"] = (cout,)
    keys[f"{prefix}.1.num_batches_tracked"] = ()
    return keys


def _neck_and_heads(stage: int, width: int) -> dict[str, tuple]:
    keys: dict[str, tuple] = {}
    for i, cin in enumerate((stage * 2, stage * 4, stage * 8), start=1):
        keys.update(_conv_bn_keys(f"fpn.output{i}", cin, width, 1))
    for name in ("merge1", "merge2"):
        keys.update(_conv_bn_keys(f"fpn.{name}", width, width, 3))
    for s in (1, 2, 3):
        keys.update(_conv_bn_keys(f"ssh{s}.conv3X3", width, width // 2, 3))
        keys.update(_conv_bn_keys(f"ssh{s}.conv5X5_1", width, width // 4, 3))
        for name in ("conv5X5_2", "conv7X7_2", "conv7x7_3"):
            keys.update(_conv_bn_keys(f"ssh{s}.{name}", width // 4, width // 4, 3))
    for head, values in (("ClassHead", 2), ("BboxHead", 4), ("LandmarkHead", 10)):
        for i in range(3):
            keys[f"{head}.{i}.conv1x1.weight"] = (2 * values, width, 1, 1)
            keys[f"{head}.{i}.conv1x1.bias"] = (2 * values,)
    return keys


def resnet50_layout() -> dict[str, tuple]:
    keys = _neck_and_heads(256, 256)
    keys.update({"body.conv1.weight": (64, 3, 7, 7)})
    for name in ("weight", "bias", "running_mean", "running_var"):
        keys[f"body.bn1.{name}"] = (64,)
    keys["body.bn1.num_batches_tracked"] = ()
    cin = 64
    for layer, (blocks, width) in enumerate(((3, 64), (4, 128), (6, 256), (3, 512)), start=1):
        for b in range(blocks):
            p = f"body.layer{layer}.{b}"
            shapes = {"conv1": (width, cin if b == 0 else width * 4, 1, 1), "conv2": (width, width, 3, 3),
                      "conv3": (width * 4, width, 1, 1)}
            for conv, shape in shapes.items():
                keys[f"{p}.{conv}.weight"] = shape
                bn = f"{p}.bn{conv[-1]}"
                for name in ("weight", "bias", "running_mean", "running_var"):
                    keys[f"{bn}.{name}"] = (shape[0],)
                keys[f"{bn}.num_batches_tracked"] = ()
            if b == 0:
                keys[f"{p}.downsample.0.weight"] = (width * 4, cin, 1, 1)
                for name in ("weight", "bias", "running_mean", "running_var"):
                    keys[f"{p}.downsample.1.{name}"] = (width * 4,)
                keys[f"{p}.downsample.1.num_batches_tracked"] = ()
        cin = width * 4
    return keys


def mobilenet_layout() -> dict[str, tuple]:
    keys = _neck_and_heads(32, 64)
    keys.update(_conv_bn_keys("body.stage1.0", 3, 8, 3))
    blocks = {"stage1": [(8, 16), (16, 32), (32, 32), (32, 64), (64, 64)],
              "stage2": [(64, 128)] + [(128, 128)] * 5, "stage3": [(128, 256), (256, 256)]}
    for stage, pairs in blocks.items():
        first = 1 if stage == "stage1" else 0
        for i, (cin, cout) in enumerate(pairs, start=first):
            p = f"body.{stage}.{i}"
            keys[f"{p}.0.weight"] = (cin, 1, 3, 3)
            keys[f"{p}.3.weight"] = (cout, cin, 1, 1)
            for bn, ch in (("1", cin), ("4", cout)):
                for name in ("weight", "bias", "running_mean", "running_var"):
                    keys[f"{p}.{bn}.{name}"] = (ch,)
                keys[f"{p}.{bn}.num_batches_tracked"] = ()
    return keys


LAYOUTS = {"resnet50": (resnet50_layout, 456), "mobilenet0.25": (mobilenet_layout, 300)}


def released_file(tmp_path, backbone: str, fill=None) -> str:
    """A file shaped like the released checkpoint (``module.``-prefixed keys), random or ``fill``-ed values."""
    layout, _ = LAYOUTS[backbone]
    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in layout().items():
        if key.endswith("num_batches_tracked"):
            state["module." + key] = torch.tensor(0)
        elif key.endswith("running_var"):
            state["module." + key] = torch.ones(shape)
        else:
            state["module." + key] = fill(key, shape) if fill else torch.randn(shape, generator=gen) * 0.05
    path = tmp_path / f"retinaface_{backbone}.pth"
    torch.save(state, path)
    return str(path)


@pytest.mark.parametrize("backbone", ["resnet50", "mobilenet0.25"])
def test_the_released_layout_loads_strictly(backbone, tmp_path):
    layout, count = LAYOUTS[backbone]
    assert len(layout()) == count
    model_keys = {k: tuple(v.shape) for k, v in RetinaFace(backbone).state_dict().items()}
    assert model_keys == layout()
    detector = RetinaFaceDetector(released_file(tmp_path, backbone))
    assert detector.model.backbone_name == backbone


def test_a_file_of_another_model_is_refused_by_name(tmp_path):
    path = tmp_path / "sr.pth"
    from metaf2n.models import RRDBNet

    torch.save({"params_ema": RRDBNet(num_feat=8, num_block=1, num_grow_ch=8).state_dict()}, path)
    with pytest.raises(ValueError, match="not a RetinaFace checkpoint"):
        RetinaFaceDetector(path)
    broken = {k: v for k, v in torch.load(released_file(tmp_path, "mobilenet0.25")).items() if "ssh2" not in k}
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="missing keys.*ssh2"):
        RetinaFaceDetector(tmp_path / "broken.pth")


def test_forward_shapes_cover_every_prior():
    model = RetinaFace("mobilenet0.25").eval()
    loc, conf, landmarks = model(torch.randn(1, 3, 100, 150))
    priors = prior_boxes(100, 150)
    # ceil(100/8) x ceil(150/8) + ... cells, two anchors each
    expected = sum(2 * math.ceil(100 / s) * math.ceil(150 / s) for s in (8, 16, 32))
    assert priors.shape == (expected, 4) and loc.shape == (1, expected, 4)
    assert conf.shape == (1, expected, 2) and landmarks.shape == (1, expected, 10)
    torch.testing.assert_close(conf.sum(-1), torch.ones(1, expected))
    assert prior_boxes(640, 640).shape[0] == 16800


def test_priors_are_ordered_level_row_column_size():
    priors = prior_boxes(64, 96)
    # first level, stride 8: cell (0, 0) with sizes 16 and 32, then cell (0, 1)
    torch.testing.assert_close(priors[0], torch.tensor([4 / 96, 4 / 64, 16 / 96, 16 / 64]))
    torch.testing.assert_close(priors[1], torch.tensor([4 / 96, 4 / 64, 32 / 96, 32 / 64]))
    torch.testing.assert_close(priors[2], torch.tensor([12 / 96, 4 / 64, 16 / 96, 16 / 64]))
    # the last prior: stride 32, bottom-right cell, size 512
    torch.testing.assert_close(priors[-1], torch.tensor([80 / 96, 48 / 64, 512 / 96, 512 / 64]))


def test_box_decoding_round_trips_and_uses_the_variances():
    priors = prior_boxes(64, 64)
    gen = torch.Generator().manual_seed(1)
    loc = torch.randn(priors.shape[0], 4, generator=gen)
    torch.testing.assert_close(encode_boxes(decode_boxes(loc, priors), priors), loc, atol=1e-5, rtol=1e-5)
    one = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    box = decode_boxes(one, priors[:1])[0]  # centre moves by 0.1 x the prior's width
    assert float((box[0] + box[2]) / 2) == pytest.approx(float(priors[0, 0] + 0.1 * priors[0, 2]))
    points = decode_landmarks(torch.ones(1, 10), priors[:1])[0]
    torch.testing.assert_close(points, (priors[0, :2] + 0.1 * priors[0, 2:]).expand(5, 2))


def test_detection_maps_the_confident_priors_to_pixels(tmp_path):
    # Zero heads except the class bias of the last level: only stride-32 priors are faces, boxes = priors.
    def fill(key, shape):
        if key.startswith(("ClassHead", "BboxHead", "LandmarkHead")):
            value = torch.zeros(shape)
            if key == "ClassHead.2.conv1x1.bias":
                value = torch.tensor([0.0, 4.0] * 2)
            elif key.startswith("ClassHead") and key.endswith("bias"):
                value = torch.tensor([4.0, 0.0] * 2)
            return value
        return torch.randn(shape) * 0.01

    detector = RetinaFaceDetector(released_file(tmp_path, "mobilenet0.25", fill), score_threshold=0.9)
    faces = detector.detect_faces(np.full((64, 96, 3), 128, np.uint8))
    # 2 x 3 cells at stride 32, sizes 256 and 512: NMS at IoU 0.4 keeps non-overlapping ones only
    assert 1 <= len(faces) <= 12
    for face in faces:
        assert face.score > 0.9
        cx, cy = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
        for centre in (cx, cy):  # on the stride-32 grid of cell centres 16, 48, 80, ...
            assert abs((centre - 16) / 32 - round((centre - 16) / 32)) < 1e-4
        assert face.box[2] - face.box[0] in (pytest.approx(256, abs=1e-3), pytest.approx(512, abs=1e-3))
        np.testing.assert_allclose(face.landmarks, np.tile([cx, cy], (5, 1)), atol=1e-3)
    assert all(len(box) == 4 for box in detector.detect(np.zeros((64, 96, 3), np.uint8)))


# --- alignment ---------------------------------------------------------------------------------------------------
def _photo_landmarks(template: np.ndarray, angle_deg: float, scale: float, shift) -> np.ndarray:
    a = math.radians(angle_deg)
    rotation = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return template @ (scale * rotation).T + np.asarray(shift)


@pytest.mark.parametrize("template,fit", [(GFPGAN_TEMPLATE_512, "lmeds"), (GPEN_TEMPLATE_512, "least_squares")])
def test_known_landmarks_map_onto_the_template(template, fit):
    photo_points = _photo_landmarks(template, 12.0, 0.3, (40.0, 25.0))
    affine = alignment(photo_points, template, 512, fit)
    mapped = photo_points @ affine[:, :2].T + affine[:, 2]
    assert np.abs(mapped - template).max() < 0.5
    affine_256 = alignment(photo_points, template, 256, fit)
    mapped = photo_points @ affine_256[:, :2].T + affine_256[:, 2]
    assert np.abs(mapped - template / 2).max() < 0.5


def test_least_squares_similarity_recovers_a_noisy_transform():
    rng = np.random.default_rng(0)
    source = rng.uniform(0, 100, (5, 2))
    target = _photo_landmarks(source, -20.0, 1.7, (5.0, -3.0))
    affine = similarity_least_squares(source, target)
    np.testing.assert_allclose(source @ affine[:, :2].T + affine[:, 2], target, atol=1e-9)


def test_warp_puts_a_landmark_marker_on_the_template_point():
    photo = np.zeros((200, 200, 3), np.uint8)
    points = _photo_landmarks(GFPGAN_TEMPLATE_512, 8.0, 0.25, (30.0, 20.0))
    x, y = points[2]  # the nose
    cv2.circle(photo, (int(round(x)), int(round(y))), 3, (255, 255, 255), -1)
    face = warp_face(photo, alignment(points, size=512), 512)
    ys, xs = np.nonzero(face[..., 0] > 128)
    assert abs(xs.mean() - GFPGAN_TEMPLATE_512[2, 0]) < 3 and abs(ys.mean() - GFPGAN_TEMPLATE_512[2, 1]) < 3


def test_paste_back_of_the_unchanged_face_restores_the_photo():
    rgb = np.ascontiguousarray(__import__("skimage.data", fromlist=["astronaut"]).astronaut())
    points = _photo_landmarks(GFPGAN_TEMPLATE_512, 5.0, 0.5, (110.0, 20.0))
    affine = alignment(points, size=256)
    face = warp_face(rgb, affine, 256)
    pasted = paste_face(rgb, face, affine)
    inverse = cv2.invertAffineTransform(affine)
    inside = cv2.warpAffine(np.ones((256, 256), np.float32), inverse, (rgb.shape[1], rgb.shape[0])) > 0.999
    diff = np.abs(pasted.astype(int) - rgb.astype(int))[inside]
    assert inside.sum() > 10000 and np.median(diff) <= 2 and diff.mean() < 4
    assert np.array_equal(pasted[~(cv2.dilate(inside.astype(np.uint8), np.ones((5, 5))) > 0)],
                          rgb[~(cv2.dilate(inside.astype(np.uint8), np.ones((5, 5))) > 0)])
    with pytest.raises(ValueError, match="landmarks"):
        alignment(np.zeros((4, 2)))


def test_the_lq_face_is_the_same_transform_scaled_by_a_quarter():
    points = _photo_landmarks(GFPGAN_TEMPLATE_512, 0.0, 0.25, (10.0, 10.0))
    affine = scaled(alignment(points, size=512), 0.25)
    mapped = points @ affine[:, :2].T + affine[:, 2]
    assert np.abs(mapped - GFPGAN_TEMPLATE_512 / 4).max() < 0.5


# --- wiring ------------------------------------------------------------------------------------------------------
LANDMARK_OFFSETS = [-0.6, -0.5, 0.6, -0.5, 0.0, 0.1, -0.5, 0.7, 0.5, 0.7]  # x0.1 x the prior's size


def _one_face_level(key, shape):
    """Heads of a detector whose stride-32 priors are faces with spread-out landmarks; everything else small."""
    if key.startswith(("ClassHead", "BboxHead", "LandmarkHead")):
        if key == "ClassHead.2.conv1x1.bias":
            return torch.tensor([0.0, 4.0] * 2)
        if key.startswith("ClassHead") and key.endswith("bias"):
            return torch.tensor([4.0, 0.0] * 2)
        if key == "LandmarkHead.2.conv1x1.bias":
            return torch.tensor(LANDMARK_OFFSETS * 2)
        return torch.zeros(shape)
    return torch.randn(shape) * 0.01


def test_infer_with_retinaface_aligns_restores_and_adapts(tmp_path, checkpoint, restorer_file):
    weights = released_file(tmp_path, "mobilenet0.25", _one_face_level)
    photo = np.ascontiguousarray(__import__("skimage.data", fromlist=["astronaut"]).astronaut())
    small = np.asarray(Image.fromarray(photo).resize((96, 96), Image.BICUBIC))
    Image.fromarray(small).save(tmp_path / "photo.png")
    out = tmp_path / "out"
    code = infer_cli.main([str(tmp_path / "photo.png"), "-o", str(out), "--checkpoint", str(checkpoint),
                           "--detector", f"retinaface:{weights}", "--restorer", str(restorer_file),
                           "--restorer-range", "-1,1", "--restorer-size", "64", "--face-preview", "--quiet",
                           "--face-recipe", "aligned", "--det-threshold", "0.5"])
    assert code == 0
    (record,) = read_jsonl(out / "summary.jsonl")
    assert Image.open(out / record["face_preview"]).size == (384, 384)
    assert record["faces_found"] >= 1 and record["faces_used"] == record["faces_found"]
    assert record["adapted"] and record["inner_after"] < record["inner_before"]
    assert Image.open(out / "photo.png").size == (384, 384)


@pytest.mark.parametrize("spec, message", [
    ("dlib", "--detector must be auto, haar, mtcnn, mtcnn:PATH or retinaface:PATH, got 'dlib'"),
    ("retinaface", "--detector must be auto, haar, mtcnn, mtcnn:PATH or retinaface:PATH, got 'retinaface'"),
    ("haar:x.xml", "--detector must be auto, haar, mtcnn, mtcnn:PATH or retinaface:PATH, got 'haar:x.xml'"),
    ("mtcnn:", "--detector must be auto, haar, mtcnn, mtcnn:PATH or retinaface:PATH, got 'mtcnn:'"),
    ("mtcnn:x.pth", "--detector weights 'x.pth' are not a file"),
    ("retinaface:x.pth", "--detector weights 'x.pth' are not a file"),
])
def test_infer_refuses_a_bad_detector_flag(tmp_path, capsys, spec, message):
    with pytest.raises(SystemExit):
        infer_cli.main([str(tmp_path), "-o", str(tmp_path / "o"), "--checkpoint", str(tmp_path / "c.pt"),
                        "--detector", spec])
    assert message in capsys.readouterr().err


# --- restorers: GFPGAN v1.3/v1.4 and GPEN-BFR -------------------------------------------------------------------
from metaf2n.faces.gfpgan import GFPGANv1Clean  # noqa: E402
from metaf2n.faces.gpen import GPEN, fused_leaky_relu, upfirdn2d  # noqa: E402
from metaf2n.faces.restorers import NetworkRestorer, load_restorer  # noqa: E402

# (count, spot checks of names and shapes) of the released files, from their published layouts
RELEASED_LAYOUTS = {
    "GFPGANv1.4": (lambda: GFPGANv1Clean(), 285, {
        "conv_body_first.weight": (32, 3, 1, 1),
        "conv_body_down.6.skip.weight": (256, 256, 1, 1),
        "final_linear.weight": (16 * 512, 256 * 16),
        "condition_scale.6.2.weight": (32, 32, 3, 3),
        "stylegan_decoder.style_mlp.15.weight": (512, 512),
        "stylegan_decoder.constant_input.weight": (1, 512, 4, 4),
        "stylegan_decoder.style_convs.13.modulated_conv.weight": (1, 64, 64, 3, 3),
        "stylegan_decoder.to_rgbs.6.modulated_conv.modulation.weight": (64, 512),
        "stylegan_decoder.noises.noise14": (1, 1, 512, 512),
        "toRGB.6.weight": (3, 32, 1, 1),
    }),
    "GPEN-BFR-512": (lambda: GPEN(512), 163, {
        "ecd0.0.0.weight": (64, 3, 1, 1),
        "ecd0.0.1.bias": (64,),
        "ecd1.0.0.kernel": (4, 4),
        "ecd7.0.1.weight": (512, 512, 3, 3),
        "final_linear.0.weight": (512, 8192),
        "generator.style.8.weight": (512, 512),
        "generator.input.input": (1, 512, 4, 4),
        "generator.conv1.activate.bias": (1024,),
        "generator.convs.12.conv.blur.kernel": (4, 4),
        "generator.convs.13.conv.weight": (1, 64, 128, 3, 3),
        "generator.to_rgbs.6.upsample.kernel": (4, 4),
        "generator.to_rgbs.6.conv.weight": (1, 3, 128, 1, 1),
    }),
    "GPEN-BFR-256": (lambda: GPEN(256), 144, {
        "ecd0.0.0.weight": (32, 3, 1, 1),
        "generator.input.input": (1, 256, 4, 4),
        "generator.convs.11.conv.weight": (1, 32, 64, 3, 3),
        "final_linear.0.weight": (512, 256 * 16),
    }),
}


@pytest.mark.parametrize("name", list(RELEASED_LAYOUTS))
def test_restorer_layouts_match_the_released_files(name):
    build, count, spots = RELEASED_LAYOUTS[name]
    state = build().state_dict()
    assert len(state) == count
    for key, shape in spots.items():
        assert tuple(state[key].shape) == shape, key
    if name == "GFPGANv1.4":
        assert sum(k.startswith("stylegan_decoder.noises.") for k in state) == 15
    if name == "GPEN-BFR-512":
        assert sum(k.endswith(".kernel") for k in state) == 21


def _tiny(kind: str):
    torch.manual_seed(0)
    if kind == "gfpgan":
        return GFPGANv1Clean(out_size=64, num_style_feat=32, narrow=0.25)
    return GPEN(64, style_dim=32, channel_multiplier=1, narrow=0.25)


@pytest.mark.parametrize("kind,layout", [("gfpgan", "params_ema"), ("gpen", "module.")])
def test_restorer_files_load_strictly_and_restore_in_range(kind, layout, tmp_path):
    model = _tiny(kind)
    state = model.state_dict()
    saved = {"params_ema": state, "params": {k: v * 0 for k, v in state.items()}} if layout == "params_ema" else {
        "module." + k: v for k, v in state.items()}
    path = tmp_path / f"{kind}.pth"
    torch.save(saved, path)
    restorer = load_restorer(f"{kind}:{path}")
    assert isinstance(restorer, NetworkRestorer) and restorer.size == 64
    for key, value in restorer.model.state_dict().items():
        assert torch.equal(value, state[key]), key  # params_ema preferred over params
    faces = torch.rand(2, 3, 64, 64)
    out = restorer(faces)
    assert out.shape == faces.shape and 0 <= float(out.min()) and float(out.max()) <= 1
    with torch.no_grad():
        expected = ((model.eval()(faces * 2 - 1) + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(out, expected)


def test_a_restorer_file_of_another_model_is_refused_by_name(tmp_path):
    path = tmp_path / "gpen.pth"
    torch.save(_tiny("gpen").state_dict(), path)
    with pytest.raises(ValueError, match="not a GFPGANv1Clean checkpoint"):
        load_restorer(f"gfpgan:{path}")
    broken = {k: v for k, v in _tiny("gfpgan").state_dict().items() if "toRGB.1" not in k}
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="missing keys.*toRGB.1"):
        load_restorer(f"gfpgan:{tmp_path / 'broken.pth'}")


def test_upfirdn2d_and_the_fused_activation_equal_their_definitions():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 5, 6, generator=gen, dtype=torch.float64)
    k = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    up, pad = 2, (2, 1)
    # definition: zero-insert, pad, correlate with the flipped kernel (= convolve with the kernel)
    z = torch.zeros(1, 2, 5 * up, 6 * up, dtype=torch.float64)
    z[..., ::up, ::up] = x
    z = torch.nn.functional.pad(z, (pad[0], pad[1], pad[0], pad[1]))
    h, w = z.shape[-2] - 3, z.shape[-1] - 3
    expected = torch.zeros(1, 2, h, w, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            for a in range(4):
                for b in range(4):
                    expected[..., i, j] += z[..., i + a, j + b] * k[3 - a, 3 - b]
    torch.testing.assert_close(upfirdn2d(x, k, up=up, pad=pad), expected)
    torch.testing.assert_close(upfirdn2d(x, k, down=2, pad=(2, 1)), upfirdn2d(x, k, pad=(2, 1))[..., ::2, ::2])
    bias = torch.tensor([0.5, -1.0], dtype=torch.float64)
    y = x + bias.view(1, 2, 1, 1)
    torch.testing.assert_close(fused_leaky_relu(x, bias), torch.where(y > 0, y, 0.2 * y) * math.sqrt(2))


@pytest.mark.parametrize("kind", ["gfpgan", "gpen"])
def test_infer_with_retinaface_and_a_released_style_restorer(kind, tmp_path, checkpoint):
    weights = released_file(tmp_path, "mobilenet0.25", _one_face_level)
    restorer_path = tmp_path / f"{kind}.pth"
    torch.save({"params_ema": _tiny(kind).state_dict()}, restorer_path)
    photo = np.ascontiguousarray(__import__("skimage.data", fromlist=["astronaut"]).astronaut())
    Image.fromarray(np.asarray(Image.fromarray(photo).resize((96, 96), Image.BICUBIC))).save(tmp_path / "p.png")
    out = tmp_path / "out"
    assert infer_cli.main([str(tmp_path / "p.png"), "-o", str(out), "--checkpoint", str(checkpoint), "--detector",
                           f"retinaface:{weights}", "--restorer", f"{kind}:{restorer_path}", "--quiet"]) == 0
    (record,) = read_jsonl(out / "summary.jsonl")
    assert record["faces_used"] >= 1 and record["adapted"]


def test_make_testset_can_cut_faces_by_detection_and_alignment(tmp_path):
    from metaf2n.data.make_testset import make_testset

    detector = RetinaFaceDetector(released_file(tmp_path, "mobilenet0.25", _one_face_level))
    out = make_testset(tmp_path / "set", "iid", count=2, seed=0, size=128, face_min=64, face_max=64, progress=False,
                       detector=detector)
    manifest = __import__("json").loads((out / "manifest.json").read_text())
    assert manifest["face_source"] == "detected and aligned" and manifest["not_detected"] == []
    for name in ("0000", "0001"):
        assert Image.open(out / "Face_LQ" / f"{name}.png").size == (128, 128)
        assert Image.open(out / "Face_HQ" / f"{name}.png").size == (512, 512)
