"""RetinaFace face detection with five landmarks (ResNet-50 or MobileNet-0.25 backbone), as facexlib runs it.

Parameter names follow the released ``detection_Resnet50_Final.pth`` (456 tensors, torchvision ResNet-50 layers under
``body.``) and ``detection_mobilenet0.25_Final.pth`` (300 tensors); the files are ``module.``-prefixed, which
:func:`metaf2n.models.load_pretrained` strips. Input convention (biubug6/Pytorch_Retinaface and facexlib): a BGR image
at its own size, values 0..255 minus the mean (104, 117, 123). Outputs per prior box: box offsets, class
probabilities (background, face) and landmark offsets, decoded against prior boxes of min sizes
[[16, 32], [64, 128], [256, 512]] at strides 8/16/32 with variances (0.1, 0.2); NMS at IoU 0.4.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from metaf2n.faces.detect import Detection, LandmarkFaceDetector

MIN_SIZES = ((16, 32), (64, 128), (256, 512))
STEPS = (8, 16, 32)
VARIANCES = (0.1, 0.2)
BGR_MEAN = (104.0, 117.0, 123.0)
BACKBONES = {
    # name: (return layers of the backbone, channels of its first returned stage / 2, FPN width)
    "resnet50": ({"layer2": 1, "layer3": 2, "layer4": 3}, 256, 256),
    "mobilenet0.25": ({"stage1": 1, "stage2": 2, "stage3": 3}, 32, 64),
}


def _conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, leaky: float | None = 0.0) -> nn.Sequential:
    """conv (no bias) + batch norm (+ LeakyReLU unless ``leaky`` is None): keys ``0.weight`` and ``1.*``."""
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout)]
    if leaky is not None:
        layers.append(nn.LeakyReLU(leaky))
    return nn.Sequential(*layers)


def _conv_dw(cin: int, cout: int, stride: int, leaky: float = 0.1) -> nn.Sequential:
    """Depthwise 3x3 + pointwise 1x1, each with batch norm and LeakyReLU (MobileNet-V1 block)."""
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.LeakyReLU(leaky),
        nn.Conv2d(cin, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(leaky),
    )


class MobileNetV1x025(nn.Module):
    """MobileNet-V1 at width 0.25, in three stages (strides 8, 16, 32 overall)."""

    def __init__(self) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(
            _conv_bn(3, 8, 3, 2, leaky=0.1), _conv_dw(8, 16, 1), _conv_dw(16, 32, 2), _conv_dw(32, 32, 1),
            _conv_dw(32, 64, 2), _conv_dw(64, 64, 1),
        )
        self.stage2 = nn.Sequential(_conv_dw(64, 128, 2), *(_conv_dw(128, 128, 1) for _ in range(5)))
        self.stage3 = nn.Sequential(_conv_dw(128, 256, 2), _conv_dw(256, 256, 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c1 = self.stage1(x)
        c2 = self.stage2(c1)
        return [c1, c2, self.stage3(c2)]


class ResNet50Body(nn.Module):
    """torchvision's ResNet-50 without its pooling and classifier; returns layer2, layer3 and layer4."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import resnet50

        net = resnet50(weights=None)
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(net, name))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer2(self.layer1(x))
        c3 = self.layer3(c2)
        return [c2, c3, self.layer4(c3)]


class FPN(nn.Module):
    def __init__(self, in_channels: tuple[int, int, int], out_channels: int) -> None:
        super().__init__()
        leaky = 0.1 if out_channels <= 64 else 0.0
        for index, cin in enumerate(in_channels, start=1):
            setattr(self, f"output{index}", _conv_bn(cin, out_channels, 1, leaky=leaky))
        self.merge1 = _conv_bn(out_channels, out_channels, leaky=leaky)
        self.merge2 = _conv_bn(out_channels, out_channels, leaky=leaky)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        o1, o2, o3 = self.output1(features[0]), self.output2(features[1]), self.output3(features[2])
        o2 = self.merge2(o2 + F.interpolate(o3, size=o2.shape[-2:], mode="nearest"))
        o1 = self.merge1(o1 + F.interpolate(o2, size=o1.shape[-2:], mode="nearest"))
        return [o1, o2, o3]


class SSH(nn.Module):
    """Single-stage headless context module: 3x3, 5x5 and 7x7 receptive fields (stacked 3x3 convs) concatenated."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        leaky = 0.1 if channels <= 64 else 0.0
        quarter = channels // 4
        self.conv3X3 = _conv_bn(channels, channels // 2, leaky=None)
        self.conv5X5_1 = _conv_bn(channels, quarter, leaky=leaky)
        self.conv5X5_2 = _conv_bn(quarter, quarter, leaky=None)
        self.conv7X7_2 = _conv_bn(quarter, quarter, leaky=leaky)
        self.conv7x7_3 = _conv_bn(quarter, quarter, leaky=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mid = self.conv5X5_1(x)
        out = torch.cat([self.conv3X3(x), self.conv5X5_2(mid), self.conv7x7_3(self.conv7X7_2(mid))], dim=1)
        return F.relu(out)


class _Head(nn.Module):
    def __init__(self, channels: int, values: int, anchors: int = 2) -> None:
        super().__init__()
        self.values = values
        self.conv1x1 = nn.Conv2d(channels, anchors * values, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1x1(x).permute(0, 2, 3, 1).reshape(x.shape[0], -1, self.values)


class RetinaFace(nn.Module):
    """``forward(x)``: (B, 3, H, W) BGR minus :data:`BGR_MEAN` -> ``(loc, conf, landmarks)`` over all prior boxes:
    (B, P, 4) box offsets, (B, P, 2) softmax probabilities (background, face), (B, P, 10) landmark offsets."""

    def __init__(self, backbone: str = "resnet50") -> None:
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {tuple(BACKBONES)}, got {backbone!r}")
        self.backbone_name = backbone
        _, stage, width = BACKBONES[backbone]
        self.body = ResNet50Body() if backbone == "resnet50" else MobileNetV1x025()
        self.fpn = FPN((stage * 2, stage * 4, stage * 8), width)
        self.ssh1, self.ssh2, self.ssh3 = SSH(width), SSH(width), SSH(width)
        self.ClassHead = nn.ModuleList(_Head(width, 2) for _ in range(3))
        self.BboxHead = nn.ModuleList(_Head(width, 4) for _ in range(3))
        self.LandmarkHead = nn.ModuleList(_Head(width, 10) for _ in range(3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fpn = self.fpn(self.body(x))
        features = [self.ssh1(fpn[0]), self.ssh2(fpn[1]), self.ssh3(fpn[2])]
        loc = torch.cat([head(f) for head, f in zip(self.BboxHead, features)], dim=1)
        conf = torch.cat([head(f) for head, f in zip(self.ClassHead, features)], dim=1)
        landmarks = torch.cat([head(f) for head, f in zip(self.LandmarkHead, features)], dim=1)
        return loc, F.softmax(conf, dim=-1), landmarks


def prior_boxes(height: int, width: int) -> torch.Tensor:
    """(P, 4) priors ``(cx, cy, w, h)`` relative to the image, in the heads' order (level, row, column, size)."""
    priors = []
    for sizes, step in zip(MIN_SIZES, STEPS):
        rows, cols = math.ceil(height / step), math.ceil(width / step)
        ys = (torch.arange(rows, dtype=torch.float32) + 0.5) * step / height
        xs = (torch.arange(cols, dtype=torch.float32) + 0.5) * step / width
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        per_size = [torch.stack([cx, cy, torch.full_like(cx, size / width), torch.full_like(cy, size / height)], -1)
                    for size in sizes]
        priors.append(torch.stack(per_size, dim=2).reshape(-1, 4))  # sizes vary fastest within a cell
    return torch.cat(priors)


def decode_boxes(loc: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """(P, 4) offsets -> (P, 4) boxes ``(x0, y0, x1, y1)`` relative to the image."""
    centres = priors[:, :2] + loc[:, :2] * VARIANCES[0] * priors[:, 2:]
    sizes = priors[:, 2:] * torch.exp(loc[:, 2:] * VARIANCES[1])
    return torch.cat([centres - sizes / 2, centres + sizes / 2], dim=1)


def encode_boxes(boxes: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`decode_boxes`."""
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    sizes = boxes[:, 2:] - boxes[:, :2]
    return torch.cat([(centres - priors[:, :2]) / (VARIANCES[0] * priors[:, 2:]),
                      torch.log(sizes / priors[:, 2:]) / VARIANCES[1]], dim=1)


def decode_landmarks(offsets: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """(P, 10) offsets -> (P, 5, 2) landmark points relative to the image."""
    points = offsets.view(-1, 5, 2)
    return priors[:, None, :2] + points * VARIANCES[0] * priors[:, None, 2:]


def nms_plus_one(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    """The classic NumPy NMS of GPEN's and MetaF2N's RetinaFace code: greedy by ``scores.argsort()[::-1]``, areas and
    intersections counted in whole pixels (``x1 - x0 + 1``), a box dropped when its overlap exceeds ``iou``."""
    x0, y0, x1, y1 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = (x1 - x0 + 1) * (y1 - y0 + 1)
    order = scores.argsort()[::-1]
    keep = []
    while order.size > 0:
        best, rest = order[0], order[1:]
        keep.append(int(best))
        w = np.maximum(0.0, np.minimum(x1[best], x1[rest]) - np.maximum(x0[best], x0[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y1[best], y1[rest]) - np.maximum(y0[best], y0[rest]) + 1)
        overlap = w * h / (areas[best] + areas[rest] - w * h)
        order = rest[overlap <= iou]
    return keep


# How each official pipeline runs RetinaFace after the network: (score threshold, NMS, top-k before and after NMS,
# the longer side above which the photo is shrunk to 1000 px).
RECIPES = {
    # facexlib's get_face_landmarks_5 (GFPGAN): threshold 0.97; candidates sorted by score (numpy argsort, reversed),
    # then torchvision's NMS at 0.4; no top-k; the photo at its own size.
    "facexlib": dict(threshold=0.97, nms="torchvision", top_k=None, keep_top_k=None, max_side=None),
    # GPEN's FaceEnhancement and MetaF2N's generate_test_faces.py: threshold 0.9, top 5000 by score, the +1-pixel
    # NumPy NMS at 0.4, at most 750 faces; a photo whose longer side exceeds 1500 px is resized (bilinear, float) by
    # 1000 / side and boxes, landmarks and scores are divided by that factor.
    "gpen": dict(threshold=0.9, nms="plus_one", top_k=5000, keep_top_k=750, max_side=1500),
}


class RetinaFaceDetector(LandmarkFaceDetector):
    """RetinaFace weights from ``path`` (``detection_Resnet50_Final.pth`` or ``detection_mobilenet0.25_Final.pth``;
    the backbone is recognised from the file) behind :class:`FaceDetector`; :meth:`detect_faces` adds landmarks.

    ``recipe`` picks the official post-processing (:data:`RECIPES`): ``"facexlib"`` (GFPGAN's pipeline) or
    ``"gpen"`` (GPEN's and MetaF2N's face-pair generator); ``score_threshold`` (None: the recipe's) and ``nms_iou``
    override it. Detections come in the recipe's order: descending score."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu",
                 score_threshold: float | None = None, nms_iou: float = 0.4, recipe: str = "facexlib") -> None:
        from metaf2n.models.checkpoint import extract_state_dict, load_pretrained

        if recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {tuple(RECIPES)}, got {recipe!r}")
        from metaf2n.io import load_torch_file

        state = extract_state_dict(load_torch_file(path, "RetinaFace weights"))
        backbone = "resnet50" if any(k.startswith("body.layer1.") for k in state) else "mobilenet0.25"
        if not any(k.startswith(("body.layer1.", "body.stage1.")) for k in state):
            raise ValueError(f"{os.fspath(path)!r} is not a RetinaFace checkpoint (expected body.layer1.* for "
                             "ResNet-50 or body.stage1.* for MobileNet-0.25)")
        self.model = load_pretrained(RetinaFace(backbone), path).to(device).eval()
        self.device = torch.device(device)
        self.recipe = recipe
        settings = RECIPES[recipe]
        self.score_threshold = float(settings["threshold"] if score_threshold is None else score_threshold)
        if not 0 <= self.score_threshold <= 1:
            raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold}")
        self.nms_iou = float(nms_iou)

    @torch.no_grad()
    def detect_faces(self, rgb: np.ndarray) -> list[Detection]:
        from torchvision.ops import nms

        self.check_image(rgb)
        settings = RECIPES[self.recipe]
        bgr = np.ascontiguousarray(rgb[..., ::-1]).astype(np.float32)
        shrink = 1.0
        if settings["max_side"] and max(bgr.shape[:2]) > settings["max_side"]:
            import cv2

            shrink = 1000.0 / max(bgr.shape[:2])
            bgr = cv2.resize(bgr, (0, 0), fx=shrink, fy=shrink)
        height, width = bgr.shape[:2]
        x = (torch.from_numpy(bgr) - torch.tensor(BGR_MEAN)).permute(2, 0, 1)[None].to(self.device)
        loc, conf, landmarks = (t[0].float().cpu() for t in self.model(x))
        priors = prior_boxes(height, width)
        scale = torch.tensor([width, height], dtype=torch.float32)
        scores = conf[:, 1].numpy()
        keep = np.where(scores > self.score_threshold)[0]
        boxes = (decode_boxes(loc[keep], priors[keep]) * scale.repeat(2)).numpy()
        points = (decode_landmarks(landmarks[keep], priors[keep]) * scale).numpy()
        scores = scores[keep]
        order = scores.argsort()[::-1][: settings["top_k"]]
        boxes, points, scores = boxes[order], points[order], scores[order]
        if settings["nms"] == "plus_one":
            kept = nms_plus_one(boxes, scores, self.nms_iou)[: settings["keep_top_k"]]
        else:
            kept = nms(torch.from_numpy(boxes), torch.from_numpy(scores), self.nms_iou).tolist()
        return [Detection(boxes[i] / shrink, points[i] / shrink, float(scores[i]) / shrink) for i in kept]
