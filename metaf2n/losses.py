"""Loss terms of the MetaF2N outer objective (besides SSL, see :mod:`metaf2n.ssl`).

* :func:`lpips_alex`: LPIPS v0.1 on AlexNet features with real weights (the ``lpips`` package's linear layers and an
  AlexNet backbone found by :func:`metaf2n.weights.find_lpips_alexnet`), frozen, images in [0, 1];
* :func:`gan_loss`: binary cross-entropy on the discriminator's per-pixel logits;
* :func:`masknet_regulariser`: how far MaskNet's weights W stray from 1.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from metaf2n.precision import at_least_float32
from metaf2n.weights import ALEXNET_CONV_INDICES, find_lpips_alexnet

logger = logging.getLogger(__name__)

REG_FORMS = ("mean_square", "l2_norm")
# lpips.pretrained_networks.alexnet puts torchvision's features[i] in the slice that holds index i.
_ALEXNET_SLICE_OF_INDEX = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}


def _backbone_state(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """torchvision-named AlexNet conv tensors -> names inside ``lpips.LPIPS.net`` (``slice{k}.{i}.*``)."""
    mapped = {}
    for index in ALEXNET_CONV_INDICES:
        for kind in ("weight", "bias"):
            key = f"features.{index}.{kind}"
            if key not in state:
                raise ValueError(f"AlexNet weights {source!r} lack {key}; keys: {sorted(state)[:12]}")
            mapped[f"slice{_ALEXNET_SLICE_OF_INDEX[index]}.{index}.{kind}"] = state[key]
    return mapped


class LPIPSAlex(nn.Module):
    """LPIPS v0.1 (AlexNet): ``forward(x, y)`` with x, y (B, 3, H, W) in [0, 1] -> (B,) distances.

    Frozen (no parameter requires a gradient) and always in eval mode; gradients flow to the inputs, including
    second-order ones. Inputs are mapped to [-1, 1] as LPIPS expects.
    """

    def __init__(self, backbone: dict[str, torch.Tensor], source: str = "<state dict>") -> None:
        super().__init__()
        import lpips

        # lpips prints its set-up and builds AlexNet through torchvision's deprecated ``pretrained=False``.
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            self.net = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
        self.net.net.load_state_dict(_backbone_state(backbone, source), strict=True)
        self._check_linear_layers_loaded()
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        self.eval()

    def _check_linear_layers_loaded(self) -> None:
        # lpips loads its linear layers with strict=False; make sure they are the shipped ones, not a random init
        # (the shipped weights are non-negative, a default Conv2d init is not).
        for k, lin in enumerate(self.net.lins):
            if (lin.model[-1].weight < 0).any():
                raise RuntimeError(f"lpips linear layer {k} was not loaded from the lpips package's weights")

    def train(self, mode: bool = True) -> "LPIPSAlex":
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"x and y must both be (B, 3, H, W), got {tuple(x.shape)} and {tuple(y.shape)}")
        return self.net(x * 2 - 1, y * 2 - 1).flatten()


def lpips_alex(weights: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> LPIPSAlex:
    """LPIPS (AlexNet, v0.1) with real weights on ``device``.

    ``weights``: a file with torchvision AlexNet tensors (``features.*``), e.g. torchvision's
    ``alexnet-owt-7be5be79.pth`` or what ``python -m metaf2n.weights lpips`` writes; None searches torchvision's
    cache, then metaf2n's. Raises FileNotFoundError naming that command when nothing is found; never falls back to
    a random backbone.
    """
    path = find_lpips_alexnet(weights)
    from metaf2n.io import load_torch_file

    state = load_torch_file(path, "LPIPS weights")
    if not isinstance(state, dict):
        raise ValueError(f"AlexNet weights {os.fspath(path)!r} must hold a state dict, got {type(state).__name__}")
    logger.info("LPIPS AlexNet backbone from %s", path)
    return LPIPSAlex(state, os.fspath(path)).to(device)


def gan_loss(logits: torch.Tensor, real: bool) -> torch.Tensor:
    """Mean binary cross-entropy of per-pixel logits against the label ``real`` (float32 under autocast)."""
    logits = at_least_float32(logits)
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits, target)


def masknet_regulariser(weights: torch.Tensor, form: str = "mean_square") -> torch.Tensor:
    """``mean((W - 1)^2) / 2`` (``"mean_square"``, the official code) or ``||W - 1||_2`` (``"l2_norm"``, eq. 10)."""
    if form not in REG_FORMS:
        raise ValueError(f"form must be one of {REG_FORMS}, got {form!r}")
    deviation = at_least_float32(weights) - 1
    if form == "mean_square":
        return deviation.pow(2).mean() / 2
    return torch.linalg.vector_norm(deviation)
