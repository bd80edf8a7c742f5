"""Face restorers that turn a degraded face into MetaF2N's pseudo label.

A restorer is called with the bicubic-upsampled LR face ``lr_up`` (B,3,H,W) in [0, 1]
and the ground-truth face ``gt`` of the same shape (only :class:`GroundTruthRestorer`
looks at it) and returns the restored face (B,3,H,W) in [0, 1]. Any plain callable
``f(lr_up) -> restored`` is accepted through :func:`as_restorer`.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable

import torch


def _check_faces(faces: torch.Tensor, name: str) -> None:
    if not isinstance(faces, torch.Tensor) or faces.dim() != 4 or faces.shape[1] != 3:
        shape = tuple(faces.shape) if isinstance(faces, torch.Tensor) else type(faces).__name__
        raise ValueError(f"{name} must be a (B, 3, H, W) tensor, got {shape}")


class FaceRestorer(abc.ABC):
    """Maps ``lr_up`` (B,3,H,W) in [0, 1] (and optionally ``gt``) to a restored face in [0, 1]."""

    @abc.abstractmethod
    def __call__(self, lr_up: torch.Tensor, gt: torch.Tensor | None = None) -> torch.Tensor: ...


class GroundTruthRestorer(FaceRestorer):
    """An oracle that returns the ground-truth face (the default when no restorer is given)."""

    def __call__(self, lr_up: torch.Tensor, gt: torch.Tensor | None = None) -> torch.Tensor:
        if gt is None:
            raise ValueError("GroundTruthRestorer needs gt, the ground-truth faces")
        _check_faces(lr_up, "lr_up")
        if gt.shape != lr_up.shape:
            raise ValueError(f"gt must have the shape of lr_up {tuple(lr_up.shape)}, got {tuple(gt.shape)}")
        return gt.clone()


class CallableRestorer(FaceRestorer):
    """Wraps ``fn(lr_up) -> restored``; the output is clamped to [0, 1] and must keep the input's shape."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        self.fn = fn

    @torch.no_grad()
    def __call__(self, lr_up: torch.Tensor, gt: torch.Tensor | None = None) -> torch.Tensor:
        _check_faces(lr_up, "lr_up")
        restored = self.fn(lr_up)
        if not isinstance(restored, torch.Tensor) or restored.shape != lr_up.shape:
            got = tuple(restored.shape) if isinstance(restored, torch.Tensor) else type(restored).__name__
            raise ValueError(f"restorer output must have the input's shape {tuple(lr_up.shape)}, got {got}")
        return restored.clamp(0, 1)


class TorchScriptRestorer(FaceRestorer):
    """A user's exported face restorer (GPEN, GFPGAN, CodeFormer, ...) saved with TorchScript.

    The module receives ``lr_up`` mapped linearly from [0, 1] to ``value_range`` (e.g.
    ``(-1, 1)`` for GPEN-style networks) on ``device``; its output is mapped back from
    ``value_range`` and clamped to [0, 1]. It runs in eval mode without gradients.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        device: str | torch.device = "cpu",
        value_range: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        low, high = value_range
        if not high > low:
            raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
        self.device = torch.device(device)
        self.value_range = (float(low), float(high))
        self.module = torch.jit.load(os.fspath(path), map_location=self.device).eval()

    @torch.no_grad()
    def __call__(self, lr_up: torch.Tensor, gt: torch.Tensor | None = None) -> torch.Tensor:
        _check_faces(lr_up, "lr_up")
        low, high = self.value_range
        inputs = lr_up.to(self.device) * (high - low) + low
        restored = self.module(inputs)
        if isinstance(restored, (tuple, list)):
            restored = restored[0]
        if not isinstance(restored, torch.Tensor) or restored.shape != inputs.shape:
            got = tuple(restored.shape) if isinstance(restored, torch.Tensor) else type(restored).__name__
            raise ValueError(f"TorchScript restorer output must have shape {tuple(inputs.shape)}, got {got}")
        restored = (restored.to(lr_up.device, lr_up.dtype) - low) / (high - low)
        return restored.clamp(0, 1)


def as_restorer(restorer: FaceRestorer | Callable[[torch.Tensor], torch.Tensor] | None) -> FaceRestorer:
    """``restorer`` as a :class:`FaceRestorer`; None gives :class:`GroundTruthRestorer`."""
    if restorer is None:
        return GroundTruthRestorer()
    if isinstance(restorer, FaceRestorer):
        return restorer
    if callable(restorer):
        return CallableRestorer(restorer)
    raise TypeError(f"restorer must be a FaceRestorer, a callable or None, got {type(restorer).__name__}")
