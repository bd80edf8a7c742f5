"""MTCNN face detection with five landmarks (Zhang et al. 2016), as facenet-pytorch runs it.

Weights: the P-, R- and O-Net state dicts that the ``facenet-pytorch==2.6.0`` wheel carries
(``python -m metaf2n.weights mtcnn`` caches them as ``$METAF2N_CACHE/mtcnn_facenet.pth``); parameter names are
facenet-pytorch's. The cascade, on an RGB image in 0..255 normalised as ``(x - 127.5) / 128``:

1. P-Net on an image pyramid: scales ``12 / min_face_size * factor**k`` while the scaled short side is >= 12, each
   level resized with area interpolation to ``int(side * scale + 1)``. Every output cell with face probability >=
   thresholds[0] proposes the box ``floor((2 * cell + 1) / scale)`` .. ``floor((2 * cell + 12) / scale)``; NMS at
   0.5 per level, then 0.7 over all levels, then the regression offsets (times the box's width/height) and a square
   around each box.
2. R-Net on each box's part inside the image (corners truncated to int, 1-based, clamped to the image), area-resized
   to 24 x 24: probability > thresholds[1] keeps it; NMS 0.7; regression with widths of ``x1 - x0 + 1``; square.
3. O-Net on 48 x 48 crops taken the same way: probability > thresholds[2]; landmarks ``x0 - 1 + (x1 - x0 + 1) * u``;
   regression; NMS at 0.7 of the intersection over the *smaller* box, areas with the +1 pixel convention.

Faces are returned largest box first. One deliberate difference: facenet-pytorch drops a box whose crop is empty
(entirely outside the image) from the crops but not from the boxes, which misaligns every later box with its
network output; such a box is dropped from both here.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from metaf2n.faces.detect import Detection, LandmarkFaceDetector

NETS = ("pnet", "rnet", "onet")


def _conv_prelu(cin: int, cout: int, kernel: int) -> tuple[nn.Conv2d, nn.PReLU]:
    return nn.Conv2d(cin, cout, kernel), nn.PReLU(cout)


class PNet(nn.Module):
    """Proposal network, fully convolutional: (B, 3, H, W) -> box offsets (B, 4, h, w), probabilities (B, 2, h, w)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = _conv_prelu(3, 10, 3)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2, self.prelu2 = _conv_prelu(10, 16, 3)
        self.conv3, self.prelu3 = _conv_prelu(16, 32, 3)
        self.conv4_1 = nn.Conv2d(32, 2, 1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_2(x), self.conv4_1(x).softmax(dim=1)


def _flatten_wh(x: torch.Tensor) -> torch.Tensor:
    # The dense layers were trained on features flattened in (W, H, C) order (the Caffe/TF export).
    return x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)


class RNet(nn.Module):
    """Refinement network: (B, 3, 24, 24) -> box offsets (B, 4), probabilities (B, 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = _conv_prelu(3, 28, 3)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = _conv_prelu(28, 48, 3)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = _conv_prelu(48, 64, 2)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu4(self.dense4(_flatten_wh(self.prelu3(self.conv3(x)))))
        return self.dense5_2(x), self.dense5_1(x).softmax(dim=1)


class ONet(nn.Module):
    """Output network: (B, 3, 48, 48) -> box offsets (B, 4), landmarks (B, 10: x1..x5, y1..y5 in [0, 1] of the box),
    probabilities (B, 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = _conv_prelu(3, 32, 3)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = _conv_prelu(32, 64, 3)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = _conv_prelu(64, 64, 3)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = _conv_prelu(64, 128, 2)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu5(self.dense5(_flatten_wh(self.prelu4(self.conv4(x)))))
        return self.dense6_2(x), self.dense6_3(x), self.dense6_1(x).softmax(dim=1)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - 127.5) * 0.0078125


def pyramid_scales(height: int, width: int, min_face_size: float, factor: float) -> list[float]:
    """The P-Net pyramid: scales 12 / min_face_size * factor**k (by repeated multiplication) while the scaled short
    side is >= 12."""
    scale = 12.0 / min_face_size
    short = min(height, width) * scale
    scales = []
    while short >= 12:
        scales.append(scale)
        scale *= factor
        short *= factor
    return scales


def square(boxes: torch.Tensor) -> torch.Tensor:
    """Each (x0, y0, x1, y1, ...) box made a square of its longer side around the same centre."""
    boxes = boxes.clone()
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = torch.maximum(w, h)
    boxes[:, 0] += w * 0.5 - side * 0.5
    boxes[:, 1] += h * 0.5 - side * 0.5
    boxes[:, 2] = boxes[:, 0] + side
    boxes[:, 3] = boxes[:, 1] + side
    return boxes


def regress(boxes: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Box regression with the +1 pixel width convention of R- and O-Net."""
    boxes = boxes.clone()
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    boxes[:, :4] += offsets * torch.stack([w, h, w, h], dim=1)
    return boxes


def crops(image: torch.Tensor, boxes: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3, size, size) area-resized crops of each box's part inside ``image`` (1, 3, H, W), and which boxes gave
    a non-empty crop. Corners are truncated to int and read 1-based: columns ``max(x0, 1) - 1 .. min(x1, W) - 1``."""
    height, width = image.shape[-2:]
    corners = boxes[:, :4].trunc().to(torch.int64).tolist()
    out, valid = [], []
    for x0, y0, x1, y1 in corners:
        x0, y0, x1, y1 = max(x0, 1), max(y0, 1), min(x1, width), min(y1, height)
        if x1 > x0 - 1 and y1 > y0 - 1:
            out.append(F.interpolate(image[..., y0 - 1 : y1, x0 - 1 : x1], size=(size, size), mode="area"))
            valid.append(True)
        else:
            valid.append(False)
    stacked = torch.cat(out) if out else image.new_zeros(0, 3, size, size)
    return stacked, torch.tensor(valid, dtype=torch.bool)


def nms_min(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy NMS by descending score where the overlap is intersection / the smaller area, with areas and
    intersections counted in whole pixels (``x1 - x0 + 1``); ties follow numpy's argsort, as facenet-pytorch's."""
    x0, y0, x1, y1 = boxes.T
    area = (x1 - x0 + 1) * (y1 - y0 + 1)
    order = np.argsort(scores)
    keep = []
    while order.size:
        best, rest = order[-1], order[:-1]
        keep.append(best)
        iw = np.maximum(0.0, np.minimum(x1[best], x1[rest]) - np.maximum(x0[best], x0[rest]) + 1)
        ih = np.maximum(0.0, np.minimum(y1[best], y1[rest]) - np.maximum(y0[best], y0[rest]) + 1)
        overlap = iw * ih / np.minimum(area[best], area[rest])
        order = rest[overlap <= threshold]
    return np.asarray(keep, dtype=np.int64)


class MTCNNDetector(LandmarkFaceDetector):
    """MTCNN behind :class:`FaceDetector`; defaults as facenet-pytorch's ``MTCNN`` (minimum face 20 px, thresholds
    (0.6, 0.7, 0.7), pyramid factor 0.709). ``weights``: a file from ``python -m metaf2n.weights mtcnn`` (None: the
    cached one)."""

    def __init__(self, weights: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                 min_face_size: float = 20, thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
                 factor: float = 0.709) -> None:
        if weights is None:
            from metaf2n.weights import MTCNN_FILE, cache_root

            weights = cache_root() / MTCNN_FILE
            if not weights.is_file():
                raise FileNotFoundError(f"no MTCNN weights at {weights}: run `python -m metaf2n.weights mtcnn` once "
                                        "(it fetches them from PyPI)")
        if not min_face_size > 0:
            raise ValueError(f"min_face_size must be > 0, got {min_face_size}")
        if len(thresholds) != 3 or not all(0 <= t <= 1 for t in thresholds):
            raise ValueError(f"thresholds must be three probabilities, got {thresholds}")
        if not 0 < factor < 1:
            raise ValueError(f"factor must be in (0, 1), got {factor}")
        from metaf2n.io import load_torch_file

        state = load_torch_file(weights, "MTCNN weights")
        if not isinstance(state, dict) or set(state) != set(NETS):
            raise ValueError(f"{os.fspath(weights)!r} is not an MTCNN weight file (expected the keys {NETS})")
        self.pnet, self.rnet, self.onet = PNet(), RNet(), ONet()
        for name in NETS:
            try:
                getattr(self, name).load_state_dict(state[name], strict=True)
            except RuntimeError as error:
                raise ValueError(f"{os.fspath(weights)!r}: {name} does not match MTCNN's {name}: {error}") from None
        self.device = torch.device(device)
        for name in NETS:
            getattr(self, name).to(self.device).eval()
        self.min_face_size = float(min_face_size)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.factor = float(factor)

    def _proposals(self, image: torch.Tensor) -> torch.Tensor:
        from torchvision.ops import nms

        height, width = image.shape[-2:]
        found = []
        for scale in pyramid_scales(height, width, self.min_face_size, self.factor):
            level = F.interpolate(image, size=(int(height * scale + 1), int(width * scale + 1)), mode="area")
            offsets, probs = self.pnet(_normalise(level))
            hit = probs[0, 1] >= self.thresholds[0]
            rows, cols = hit.nonzero(as_tuple=True)
            cells = torch.stack([cols, rows], dim=1).to(image.dtype)
            boxes = torch.cat([((2 * cells + 1) / scale).floor(), ((2 * cells + 12) / scale).floor(),
                               probs[0, 1][hit][:, None], offsets[0][:, hit].T], dim=1)
            found.append(boxes[nms(boxes[:, :4], boxes[:, 4], 0.5)])
        boxes = torch.cat(found) if found else image.new_zeros(0, 9)
        boxes = boxes[nms(boxes[:, :4], boxes[:, 4], 0.7)]
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        corrected = boxes[:, :4] + boxes[:, 5:9] * torch.stack([w, h, w, h], dim=1)
        return square(torch.cat([corrected, boxes[:, 4:5]], dim=1))

    @torch.no_grad()
    def detect_faces(self, rgb: np.ndarray) -> list[Detection]:
        from torchvision.ops import nms

        self.check_image(rgb)
        image = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)[None].float().to(self.device)
        boxes = self._proposals(image)
        if len(boxes):
            patches, valid = crops(image, boxes, 24)
            if not valid.any():
                return []
            boxes = boxes[valid.to(boxes.device)]
            offsets, probs = self.rnet(_normalise(patches))
            keep = probs[:, 1] > self.thresholds[1]
            boxes = torch.cat([boxes[keep, :4], probs[keep, 1:2]], dim=1)
            offsets = offsets[keep]
            pick = nms(boxes[:, :4], boxes[:, 4], 0.7)
            boxes = square(regress(boxes[pick], offsets[pick]))
        if not len(boxes):
            return []
        patches, valid = crops(image, boxes, 48)
        if not valid.any():
            return []
        boxes = boxes[valid.to(boxes.device)]
        offsets, points, probs = self.onet(_normalise(patches))
        keep = probs[:, 1] > self.thresholds[2]
        boxes = torch.cat([boxes[keep, :4], probs[keep, 1:2]], dim=1)
        points, offsets = points[keep], offsets[keep]
        w = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
        h = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
        xs = w * points[:, :5] + boxes[:, 0:1] - 1
        ys = h * points[:, 5:] + boxes[:, 1:2] - 1
        landmarks = torch.stack([xs, ys], dim=2)
        boxes = regress(boxes, offsets).cpu().numpy()
        landmarks = landmarks.cpu().numpy()
        pick = nms_min(boxes[:, :4], boxes[:, 4], 0.7)
        boxes, landmarks = boxes[pick], landmarks[pick]
        order = np.argsort((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[::-1]
        return [Detection(boxes[i, :4].copy(), landmarks[i].copy(), float(boxes[i, 4])) for i in order]
