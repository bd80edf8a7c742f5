"""Face-guided test-time adaptation and whole-photo super-resolution (the library behind ``metaf2n.infer``).

For one low-quality photo:

1. face pairs: LR face crops with their pseudo-HQ faces (4x their size), from detected faces and a face restorer
   (:func:`faces_from_photo`) or from precomputed files (:func:`faces_from_files`);
2. :func:`sample_face_patches` pools aligned LR/HQ patch pairs (16 -> 64 px) over the faces; a face smaller than a
   patch is used whole;
3. :func:`adapt_to_faces`: ``steps`` SGD steps of MetaF2N's MaskNet-weighted face L1 (:func:`metaf2n.maml.adapt`),
   W = 1 when the checkpoint has no MaskNet (a plain Real-ESRGAN RRDBNet);
4. :func:`tiled_super_resolve`: the adapted weights on the whole photo in overlapping tiles (bounded memory).

The adapted weights are a dict passed to ``functional_call``: the model itself never changes, so nothing leaks into
the next photo.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metaf2n.data.images import resize_image
from metaf2n.data.restorers import FaceRestorer
from metaf2n.faces.detect import FaceDetector, square_around
from metaf2n.maml import adapt, face_weights, inner_loss
from metaf2n.models import MaskNet, RRDBNet, load_pretrained
from metaf2n.precision import autocast

logger = logging.getLogger(__name__)

SCALE = RRDBNet.scale


@dataclass
class SRModel:
    """An SR network with what adaptation needs: MaskNet (None: W = 1) and the default inner learning rate."""

    sr: nn.Module
    masknet: nn.Module | None
    inner_lr: float
    source: str


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", ema: bool = False) -> SRModel:
    """A metaf2n checkpoint (``sr``, ``masknet``, ``config``: a training run's, or an official MetaF2N one converted
    by ``python -m metaf2n.weights metaf2n-tf``; ``ema`` picks ``sr_ema`` when present) or a Real-ESRGAN RRDBNet
    x4plus checkpoint (``params_ema``/``params``/bare; no MaskNet, inner lr 1e-2)."""
    from metaf2n.io import load_torch_file

    state = load_torch_file(path, "--checkpoint")
    if isinstance(state, dict) and {"sr", "masknet", "config"} <= set(state):
        config = state["config"]
        try:
            sr = RRDBNet(num_feat=config["num_feat"], num_block=config["num_block"],
                         num_grow_ch=config["num_grow_ch"])
            sr.load_state_dict(state["sr_ema"] if ema and state.get("sr_ema") else state["sr"])
            masknet = MaskNet(num_feat=config["masknet_feat"], upsample=config.get("masknet_upsample", "torch"))
            masknet.load_state_dict(state["masknet"])
        except (KeyError, TypeError, RuntimeError, ValueError) as error:
            reason = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
            raise ValueError(f"--checkpoint {os.fspath(path)!r}: its config does not match its weights ({reason})") \
                from None
        model = SRModel(sr, masknet, float(config["inner_lr"]), "metaf2n")
    else:
        sr = load_pretrained(RRDBNet(), path)
        logger.warning("%s is a plain RRDBNet checkpoint: no MaskNet, faces are weighted W = 1", os.fspath(path))
        model = SRModel(sr, None, 1e-2, "rrdbnet")
    model.sr.to(device).eval().requires_grad_(False)
    if model.masknet is not None:
        model.masknet.to(device).eval().requires_grad_(False)
    return model


# --- faces -------------------------------------------------------------------------------------------------------
@dataclass
class FacePair:
    """An LR face crop (3, s, s) and its pseudo-HQ face (3, 4s, 4s), both in [0, 1]; ``box`` in LR pixels, or
    ``affine`` (2, 3): the alignment mapping LR photo pixels onto the HQ face's pixels."""

    lr: torch.Tensor
    hq: torch.Tensor
    box: tuple[int, int, int] | None = None
    affine: np.ndarray | None = None


def faces_from_photo(
    photo: torch.Tensor,
    detector: FaceDetector,
    restorer: FaceRestorer,
    restorer_size: int = 512,
    margin: float = 1.5,
) -> tuple[list[FacePair], int]:
    """Detect faces in the LR ``photo`` (3, H, W), crop squares ``margin`` x the box, restore each at
    ``restorer_size`` and bring the result to 4x the crop. Returns the pairs and the number of faces found."""
    rgb = (photo.permute(1, 2, 0).clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()
    boxes = detector.detect(rgb)
    pairs = []
    for box in boxes:
        top, left, side = square_around(box, photo.shape[-2:], margin)
        crop = photo[:, top : top + side, left : left + side]
        up = F.interpolate(crop[None], size=(restorer_size, restorer_size), mode="bicubic", align_corners=False)
        restored = restorer(up.clamp(0, 1))[0]
        pairs.append(FacePair(crop, resize_image(restored, (SCALE * side, SCALE * side)), (top, left, side)))
    return pairs, len(boxes)


def faces_from_landmarks(
    photo: torch.Tensor,
    landmarks: Sequence,
    restorer: FaceRestorer,
    restorer_size: int = 512,
    template: str = "gfpgan",
) -> list[FacePair]:
    """Faces aligned by five landmarks (LR photo pixels): the affine onto the ``template``'s FFHQ points at
    ``restorer_size`` (GFPGAN: partial-affine LMEDS, GPEN: least-squares similarity), scaled by 1/4, cuts the LQ face
    (``restorer_size / 4``) from the LR photo; its bicubic x4 upsampling is restored at ``restorer_size``."""
    from metaf2n.faces.align import scaled, template_alignment, warp_face

    if restorer_size % SCALE:
        raise ValueError(f"restorer_size must be a multiple of {SCALE}, got {restorer_size}")
    rgb = photo.permute(1, 2, 0).clamp(0, 1).cpu().numpy().astype(np.float32) * 255
    lq_size = restorer_size // SCALE
    affines, faces = [], []
    for marks in landmarks:
        affine = template_alignment(marks, template, restorer_size)
        face = torch.from_numpy(warp_face(rgb, scaled(affine, 1 / SCALE), lq_size, template) / 255).permute(2, 0, 1)
        affines.append(affine)
        faces.append(face.clamp(0, 1).to(photo.device, photo.dtype))
    if not faces:
        return []
    lq = torch.stack(faces)
    up = F.interpolate(lq, scale_factor=SCALE, mode="bicubic", align_corners=False).clamp(0, 1)
    restored = restorer(up)  # all faces of the photo in one batch
    return [FacePair(lq[i], restored[i], affine=affines[i]) for i in range(len(faces))]


def face_preview(photo: torch.Tensor, pairs: Sequence[FacePair]) -> np.ndarray:
    """The bicubic x4 photo with each aligned pseudo-HQ face pasted back (feathered): a "faces enhanced" preview,
    (4H, 4W, 3) uint8."""
    from metaf2n.faces.align import paste_face

    up = F.interpolate(photo[None].float(), scale_factor=SCALE, mode="bicubic", align_corners=False)[0].clamp(0, 1)
    canvas = (up.permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)
    for pair in pairs:
        if pair.affine is None:
            continue
        affine_hr = np.hstack([pair.affine[:, :2] / SCALE, pair.affine[:, 2:]])  # HR pixel = SCALE x LR pixel
        face = pair.hq.permute(1, 2, 0).float().cpu().numpy() * 255
        canvas = paste_face(canvas, face, affine_hr)
    return canvas


def faces_from_files(lq_paths: Sequence[str | os.PathLike], hq_paths: Sequence[str | os.PathLike],
                     read: Callable[[str | os.PathLike], torch.Tensor]) -> list[FacePair]:
    """Precomputed face pairs (the official test-set layout): each HQ face is resized to 4x its LQ face."""
    pairs = []
    for lq_path, hq_path in zip(lq_paths, hq_paths):
        lq, hq = read(lq_path), read(hq_path)
        pairs.append(FacePair(lq, resize_image(hq, (SCALE * lq.shape[-2], SCALE * lq.shape[-1]))))
    return pairs


def sample_face_patches(
    pairs: Sequence[FacePair], num_patches: int, generator: torch.Generator, lr_patch: int = 16
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``num_patches`` aligned LR/HQ patch pairs (``lr_patch`` -> 4x) drawn uniformly over the faces that hold one,
    plus each smaller face whole. Returns parallel lists of (n, 3, h, w) batches, one per size."""
    if num_patches < 1:
        raise ValueError(f"num_patches must be >= 1, got {num_patches}")
    big = [p for p in pairs if min(p.lr.shape[-2:]) >= lr_patch]
    lr_groups, hq_groups = [], []
    if big:
        lrs, hqs = [], []
        for _ in range(num_patches):
            pair = big[int(torch.randint(0, len(big), (), generator=generator))]
            top = int(torch.randint(0, pair.lr.shape[-2] - lr_patch + 1, (), generator=generator))
            left = int(torch.randint(0, pair.lr.shape[-1] - lr_patch + 1, (), generator=generator))
            lrs.append(pair.lr[:, top : top + lr_patch, left : left + lr_patch])
            hq = SCALE * lr_patch
            hqs.append(pair.hq[:, SCALE * top : SCALE * top + hq, SCALE * left : SCALE * left + hq])
        lr_groups.append(torch.stack(lrs))
        hq_groups.append(torch.stack(hqs))
    for pair in pairs:
        if min(pair.lr.shape[-2:]) < lr_patch:
            lr_groups.append(pair.lr[None])
            hq_groups.append(pair.hq[None])
    return lr_groups, hq_groups


PatchCoordinates = list[tuple[int, int | None, int | None]]


def sample_official_patches(
    pairs: Sequence[FacePair],
    per_face: int,
    generator: torch.Generator | None,
    lr_patch: int = 16,
    coordinates: PatchCoordinates | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], PatchCoordinates]:
    """The official MetaF2N test's patches (its ``test.py``): for each face in order, ``per_face`` aligned LR/HQ
    patch pairs (``lr_patch`` -> 4x) at offsets drawn uniformly from ``[0, side - lr_patch)`` (the upper bound
    excluded, as Python's ``random.randrange``). A face whose LR height or width is <= ``lr_patch`` is used whole if
    no patch has been taken yet, and ends the list; otherwise it is skipped.

    ``coordinates`` (``(face index, top, left)`` in LR pixels; ``(face index, None, None)`` for a whole face)
    replaces the draw, so that a test can feed two implementations the same patches. Returns the LR and HQ batches
    (one group) and the coordinates used."""
    if per_face < 1:
        raise ValueError(f"per_face must be >= 1, got {per_face}")
    hq_patch = SCALE * lr_patch
    if coordinates is not None:
        coordinates = list(coordinates)
        for face, top, left in coordinates:
            if not 0 <= face < len(pairs):
                raise ValueError(f"coordinates: face {face} does not exist ({len(pairs)} faces)")
            if top is None and left is None:
                if len(coordinates) != 1:
                    raise ValueError("coordinates: a whole face (face, None, None) must be the only entry")
                return [pairs[face].lr[None]], [pairs[face].hq[None]], coordinates
            pair = pairs[face]
            if not (0 <= top <= pair.lr.shape[-2] - lr_patch and 0 <= left <= pair.lr.shape[-1] - lr_patch):
                raise ValueError(f"coordinates: patch ({face}, {top}, {left}) does not fit face {face} of "
                                 f"{tuple(pair.lr.shape)}")
    else:
        coordinates = []
        for index, pair in enumerate(pairs):
            height, width = pair.lr.shape[-2:]
            if height <= lr_patch or width <= lr_patch:
                if not coordinates:
                    return [pair.lr[None]], [pair.hq[None]], [(index, None, None)]
                continue
            for _ in range(per_face):
                top = int(torch.randint(0, height - lr_patch, (), generator=generator))
                left = int(torch.randint(0, width - lr_patch, (), generator=generator))
                coordinates.append((index, top, left))
    if not coordinates:
        return [], [], []
    lrs = [pairs[f].lr[:, t : t + lr_patch, l : l + lr_patch] for f, t, l in coordinates]
    hqs = [pairs[f].hq[:, SCALE * t : SCALE * t + hq_patch, SCALE * l : SCALE * l + hq_patch]
           for f, t, l in coordinates]
    return [torch.stack(lrs)], [torch.stack(hqs)], coordinates


@dataclass
class Adaptation:
    params: dict[str, torch.Tensor]
    inner_before: float
    inner_after: float


def adapt_to_faces(
    model: SRModel,
    lr_groups: list[torch.Tensor],
    hq_groups: list[torch.Tensor],
    steps: int = 1,
    inner_lr: float | None = None,
    precision: str = "fp32",
) -> Adaptation:
    """``steps`` SGD steps of the MaskNet-weighted face L1 from the model's weights; returns detached fast weights
    and the inner loss before and after."""
    device = next(model.sr.parameters()).device
    lr_groups = [g.to(device) for g in lr_groups]
    hq_groups = [g.to(device) for g in hq_groups]
    lr = model.inner_lr if inner_lr is None else inner_lr
    with torch.no_grad(), autocast(device, precision):
        if model.masknet is not None:
            weights = [face_weights(model.masknet, g_lr, g_hq).float() for g_lr, g_hq in zip(lr_groups, hq_groups)]
        else:
            weights = [torch.ones_like(g[:, :1]) for g in hq_groups]
    params = {n: p.detach().requires_grad_() for n, p in model.sr.named_parameters()}
    with autocast(device, precision):
        fast, before = adapt(model.sr, weights, lr_groups, hq_groups, lr, steps, "first", create_graph=False,
                             params=params)
    fast = {n: p.detach() for n, p in fast.items()}
    with torch.no_grad(), autocast(device, precision):
        after = inner_loss(model.sr, fast, lr_groups, hq_groups, weights)
    return Adaptation(fast, float(before.detach()), float(after))


# --- whole-photo SR ----------------------------------------------------------------------------------------------
ENGINES = ("auto", "winograd", "torch")


def resolve_engine(engine: str, model: nn.Module, device: torch.device, precision: str) -> str:
    """The engine :func:`tiled_super_resolve` runs for ``engine`` ("auto", "winograd" or "torch"): "winograd" or
    "torch". Raises ValueError when "winograd" is asked for where it does not apply."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "torch":
        return engine
    from . import winograd

    if engine == "auto":
        return "winograd" if winograd.preferred(model, device, precision) else "torch"
    if torch.device(device).type != "cpu" or precision != "fp32" or not winograd.supports(model):
        raise ValueError("engine 'winograd' needs an RRDBNet with channel counts that are multiples of 16, "
                         f"the CPU and precision fp32 (got {torch.device(device).type}, {precision})")
    return engine


def use_channels_last(model: nn.Module) -> nn.Module:
    """``model`` with its 4-D weights in channels_last (NHWC) layout, which oneDNN runs faster on the CPU:
    Real-ESRGAN x4plus 1.1-1.4x (bench/bench_sr.py); outputs within 1e-5 of NCHW. :func:`tiled_super_resolve` feeds
    such a model NHWC inputs."""
    return model.to(memory_format=torch.channels_last)



def tile_grid(height: int, width: int, tile: int) -> list[tuple[int, int, int, int]]:
    """Non-overlapping ``(y0, y1, x0, x1)`` cores covering the image (tile <= 0: one core)."""
    if tile <= 0:
        return [(0, height, 0, width)]
    return [(y, min(y + tile, height), x, min(x + tile, width)) for y in range(0, height, tile)
            for x in range(0, width, tile)]


@torch.no_grad()
def tiled_super_resolve(
    model: nn.Module,
    lr: torch.Tensor,
    params: dict[str, torch.Tensor] | None = None,
    tile: int = 256,
    overlap: int = 32,
    precision: str = "fp32",
    progress: Callable | None = None,
    engine: str = "torch",
) -> torch.Tensor:
    """x4 SR of ``lr`` (1, 3, H, W) in tiles: each ``tile`` x ``tile`` core is computed with ``overlap`` LR pixels of
    context on each side and only the core's output is kept. Exact (to float rounding) when ``overlap`` covers the
    network's receptive field; ``tile <= 0`` runs the photo whole. Returns (1, 3, 4H, 4W) clamped to [0, 1].

    ``engine``: ``"torch"`` runs ``model`` itself; ``"winograd"`` runs an RRDBNet through
    :class:`metaf2n.winograd.WinogradRRDBNet` (float32 CPU, 2-2.5x faster for x4plus); ``"auto"`` picks Winograd
    where :func:`metaf2n.winograd.preferred` says so."""
    if lr.dim() != 4 or lr.shape[0] != 1:
        raise ValueError(f"lr must be (1, C, H, W), got {tuple(lr.shape)}")
    if overlap < 0:
        raise ValueError(f"overlap must be >= 0, got {overlap}")
    engine = resolve_engine(engine, model, lr.device, precision)
    if engine == "winograd":
        from .winograd import WinogradRRDBNet

        model, params = WinogradRRDBNet(model, params), None

    weight = next(model.parameters())
    layout = torch.channels_last if weight.dim() == 4 and not weight.is_contiguous() and \
        weight.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format

    def run(x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=layout)  # the layout of the model's weights (see use_channels_last)
        with autocast(x.device, precision):
            y = functional_call(model, params, (x,)) if params is not None else model(x)
        return y.float()

    _, _, height, width = lr.shape
    cores = tile_grid(height, width, tile)
    if len(cores) == 1:
        return run(lr).clamp(0, 1)
    out = torch.empty(1, 3, SCALE * height, SCALE * width, device=lr.device)
    for y0, y1, x0, x1 in (progress(cores) if progress else cores):
        py0, py1 = max(y0 - overlap, 0), min(y1 + overlap, height)
        px0, px1 = max(x0 - overlap, 0), min(x1 + overlap, width)
        piece = run(lr[..., py0:py1, px0:px1])
        out[..., SCALE * y0 : SCALE * y1, SCALE * x0 : SCALE * x1] = piece[
            ..., SCALE * (y0 - py0) : SCALE * (y1 - py0), SCALE * (x0 - px0) : SCALE * (x1 - px0)
        ]
    return out.clamp(0, 1)
