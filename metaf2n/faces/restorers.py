"""Face restorers from weight files: ``gfpgan:PATH``, ``gpen:PATH`` or ``torchscript:PATH`` (a bare PATH is
TorchScript). The architecture's sizes are read from the file, so GFPGAN v1.3/v1.4 and GPEN-BFR-512/256 (and
smaller variants) all load with ``strict=True`` through :func:`metaf2n.models.load_pretrained`."""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from metaf2n.data.restorers import FaceRestorer, TorchScriptRestorer, _check_faces
from metaf2n.models.checkpoint import extract_state_dict, load_pretrained
from metaf2n.precision import autocast

KINDS = ("gfpgan", "gpen", "torchscript")


class NetworkRestorer(FaceRestorer):
    """A restorer network working on ``size`` x ``size`` RGB faces in [-1, 1], in eval mode without gradients.

    ``lr_up`` (B, 3, H, W) in [0, 1] is resized to ``size`` if needed, restored, and resized back."""

    def __init__(self, model: nn.Module, size: int, device: str | torch.device = "cpu",
                 precision: str = "fp32") -> None:
        self.model = model.to(device).eval().requires_grad_(False)
        self.size = int(size)
        self.device = torch.device(device)
        self.precision = precision  # bf16 / fp16 autocast on CUDA only

    @torch.no_grad()
    def __call__(self, lr_up: torch.Tensor, gt: torch.Tensor | None = None) -> torch.Tensor:
        _check_faces(lr_up, "lr_up")
        x = lr_up.to(self.device, torch.float32)
        size = x.shape[-2:]
        if tuple(size) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False, antialias=True)
        with autocast(self.device, self.precision if self.device.type == "cuda" else "fp32"):
            out = (self.model(x.clamp(0, 1) * 2 - 1).float() + 1) / 2
        if tuple(size) != (self.size, self.size):
            out = F.interpolate(out, size=size, mode="bicubic", align_corners=False, antialias=True)
        return out.clamp(0, 1).to(lr_up.device, lr_up.dtype)


def _count(state: dict, prefix: str, suffix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix) and k.endswith(suffix)})


def gfpgan_from_state(state: dict[str, torch.Tensor]) -> nn.Module:
    """A :class:`~metaf2n.faces.gfpgan.GFPGANv1Clean` shaped like ``state``."""
    from metaf2n.faces.gfpgan import GFPGANv1Clean, _channels

    if "stylegan_decoder.constant_input.weight" not in state or "conv_body_first.weight" not in state:
        raise ValueError("not a GFPGANv1Clean checkpoint (expected conv_body_first.* and stylegan_decoder.*)")
    out_size = 2 ** (_count(state, "conv_body_down.", ".conv1.weight") + 2)
    style_dim = state["stylegan_decoder.style_mlp.1.weight"].shape[0]
    num_mlp = _count(state, "stylegan_decoder.style_mlp.", ".weight")
    narrow = state["stylegan_decoder.constant_input.weight"].shape[1] / 512
    unit = _channels(narrow * 0.5, 1)[out_size]  # U-Net width at out_size for channel multiplier 1
    multiplier = state["conv_body_first.weight"].shape[0] / unit if out_size >= 64 else 1
    sft_half = state["condition_scale.0.2.weight"].shape[0] == state["condition_scale.0.0.weight"].shape[0]
    different_w = state["final_linear.weight"].shape[0] != style_dim
    return GFPGANv1Clean(out_size, style_dim, multiplier, num_mlp, input_is_latent=True, different_w=different_w,
                         narrow=narrow, sft_half=sft_half)


def gpen_from_state(state: dict[str, torch.Tensor]) -> nn.Module:
    """A :class:`~metaf2n.faces.gpen.GPEN` shaped like ``state``."""
    from metaf2n.faces.gpen import GPEN

    if "ecd0.0.0.weight" not in state or "generator.input.input" not in state:
        raise ValueError("not a GPEN checkpoint (expected ecd0.* and generator.*)")
    size = 2 ** (_count(state, "ecd", ".weight") + 1)
    style_dim = state["generator.style.1.weight"].shape[0]
    n_mlp = _count(state, "generator.style.", ".weight")
    narrow = state["generator.input.input"].shape[1] / 512
    width_at_size = {4: 512, 8: 512, 16: 512, 32: 512}.get(size)
    multiplier = 1 if width_at_size else state["ecd0.0.0.weight"].shape[0] / (
        {64: 256, 128: 128, 256: 64, 512: 32, 1024: 16}[size] * narrow)
    return GPEN(size, style_dim, n_mlp, channel_multiplier=multiplier, narrow=narrow)


def load_restorer(spec: str, device: str | torch.device = "cpu",
                  value_range: tuple[float, float] = (0.0, 1.0), precision: str = "fp32") -> FaceRestorer:
    """``gfpgan:PATH`` | ``gpen:PATH`` | ``torchscript:PATH`` | ``PATH`` (TorchScript, ``value_range``)."""
    kind, sep, path = spec.partition(":")
    if not sep or kind not in KINDS:
        kind, path = "torchscript", spec
    if not os.path.isfile(path):
        raise ValueError(f"--restorer {spec!r}: {path!r} is not a file")
    if kind == "torchscript":
        return TorchScriptRestorer(path, device, value_range)
    from metaf2n.io import load_torch_file

    state = extract_state_dict(load_torch_file(path, "restorer weights"))
    model = (gfpgan_from_state if kind == "gfpgan" else gpen_from_state)(state)
    load_pretrained(model, path)
    size = model.out_size if kind == "gfpgan" else model.size
    if size != 2 ** round(math.log2(size)):
        raise ValueError(f"unexpected face size {size} in {path!r}")
    return NetworkRestorer(model, size, device, precision)
