"""MetaF2N's meta-learning: adapt the SR network to a task through its faces, judge it on the task's backgrounds.

Per task t of a :class:`~metaf2n.data.TaskBatch` (one photo, one degradation):

1. ``W = masknet(up(face_lr), face_pseudo)``, once per task (``up``: bicubic x4 as the MaskNet expects it, see
   :meth:`~metaf2n.models.MaskNet.upsample_lr`);
2. ``inner(theta) = mean(W * |sr_theta(face_lr) - face_pseudo|)`` and ``inner_steps`` SGD steps
   ``theta_{k+1} = theta_k - inner_lr * g_k``:

   * ``mode="first"`` (default, first-order MAML): ``g_k`` is the gradient at ``theta_k.detach()`` taken with
     ``create_graph=True``, so the fast weights keep their exact dependence on MaskNet (the mixed derivative) and drop
     only the Hessian in theta;
   * ``mode="second"`` (the official MetaF2N code): ``g_k`` is the gradient at ``theta_k`` itself, differentiated
     through;

3. the outer loss on the backgrounds with the fast weights: ``w_l1 * L1 + w_lpips * LPIPS + w_gan * GAN + w_reg *
   reg(W) + w_ssl * SSL``; SSL's graph-L1 stays inside SSL (eq. 12), never merged into the image L1. SSL uses the
   batch's edge masks (cut from masks of the whole background crops, as published) when the batch has them.

The network is never mutated: fast weights are a dict passed to :func:`torch.func.functional_call`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.func import functional_call

from metaf2n.checks import require_choice, require_int, require_number
from metaf2n.data.tasks import TaskBatch
from metaf2n.losses import REG_FORMS, gan_loss, masknet_regulariser
from metaf2n.ops import PADDINGS
from metaf2n.precision import at_least_float32 as _full
from metaf2n.ssl import ssl_loss

MODES = ("first", "second")
SSL_TARGETS = ("hr", "usm")
LOSS_KEYS = ("total", "l1", "lpips", "gan", "reg", "ssl", "inner")


@dataclass(frozen=True)
class MetaConfig:
    """The meta-objective. Loss weights: ``w_*``; the SSL arguments are those of :func:`metaf2n.ssl.ssl_loss`."""

    inner_lr: float = 1e-2
    inner_steps: int = 1
    mode: str = "first"
    reg_form: str = "mean_square"
    w_l1: float = 1.0
    w_lpips: float = 0.5
    w_gan: float = 0.1
    w_reg: float = 0.002
    w_ssl: float = 1.0
    ssl_target: str = "hr"
    search: int = 25
    patch: int = 9
    h: float = 0.004
    kl_weight: float = 1000.0
    l1_weight: float = 1000.0
    padding: str = "image"
    threshold: float = 20.0
    stride: int = 1

    def __post_init__(self) -> None:
        choices = {"mode": MODES, "reg_form": REG_FORMS, "ssl_target": SSL_TARGETS, "padding": PADDINGS}
        for name, allowed in choices.items():
            require_choice(name, getattr(self, name), allowed)
        for name in ("inner_steps", "search", "patch", "stride"):
            require_int(name, getattr(self, name), 1)
        for name in ("inner_lr", "w_l1", "w_lpips", "w_gan", "w_reg", "w_ssl", "kl_weight", "l1_weight", "threshold"):
            require_number(name, getattr(self, name))
        require_number("h", self.h, strict=True)

    def ssl_kwargs(self) -> dict:
        names = ("search", "patch", "h", "kl_weight", "l1_weight", "padding", "threshold", "stride")
        return {name: getattr(self, name) for name in names}

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class MetaOutputs:
    """What one meta-batch produced: the loss terms (means over tasks), the adapted background SR (T,Q,3,H,W,
    detached, float32) for the discriminator, and MaskNet's weights (T,P,1,h,w, detached)."""

    losses: dict[str, torch.Tensor]
    sr_backgrounds: torch.Tensor
    face_weights: torch.Tensor


@contextlib.contextmanager
def timed(timings: dict[str, float] | None, name: str, device: torch.device):
    """Add the wall time of the block to ``timings[name]`` (synchronising CUDA around it); nothing when None."""
    if timings is None:
        yield
        return
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def face_weights(masknet: nn.Module, face_lr: torch.Tensor, face_pseudo: torch.Tensor) -> torch.Tensor:
    """MaskNet's per-pixel weights (P,1,H,W) from LR faces (P,3,h,w) and their pseudo labels (P,3,H,W)."""
    return masknet(masknet.upsample_lr(face_lr, tuple(face_pseudo.shape[-2:])), face_pseudo)


Faces = torch.Tensor | Sequence[torch.Tensor]


def _groups(*tensors):
    """One tensor or parallel sequences of tensors (faces of different sizes) -> parallel lists."""
    if isinstance(tensors[0], torch.Tensor):
        return [[t] for t in tensors]
    lists = [list(t) for t in tensors]
    if not lists[0] or any(len(group) != len(lists[0]) for group in lists):
        raise ValueError("face_lr, face_pseudo and weights must be tensors or equally long non-empty sequences")
    return lists


def inner_loss(
    sr: nn.Module,
    params: dict[str, torch.Tensor],
    face_lr: Faces,
    face_pseudo: Faces,
    weights: Faces,
) -> torch.Tensor:
    """``mean(W * |sr_params(face_lr) - face_pseudo|)`` over every element, W broadcast over channels.

    Each argument is a (P, C, h, w) batch, or a sequence of such batches of different sizes (faces too small for a
    patch at inference); the mean is then over the elements of all of them.
    """
    total, count = 0.0, 0
    for lr, pseudo, w in zip(*_groups(face_lr, face_pseudo, weights)):
        out = functional_call(sr, params, (lr,))
        error = _full(w) * (_full(out) - pseudo).abs()
        if isinstance(face_lr, torch.Tensor):
            return error.mean()
        total = total + error.sum()
        count += error.numel()
    return total / count


def adapt(
    sr: nn.Module,
    weights: Faces,
    face_lr: Faces,
    face_pseudo: Faces,
    inner_lr: float,
    steps: int = 1,
    mode: str = "first",
    create_graph: bool = True,
    grad_scale: float | None = None,
    params: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``steps`` SGD steps of :func:`inner_loss` from ``params`` (default: ``sr``'s parameters).

    ``weights``, ``face_lr`` and ``face_pseudo`` are batches or sequences of batches, as :func:`inner_loss` takes.
    Returns ``(fast_params, inner_loss_before)``. ``create_graph=False`` gives fast weights for inference (no path
    to MaskNet or theta through the gradient). ``grad_scale`` (fp16 with a GradScaler) multiplies the inner loss
    before differentiation and divides the gradient after, as in PyTorch's AMP gradient-penalty recipe.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    theta = dict(sr.named_parameters()) if params is None else dict(params)
    before = None
    for _ in range(steps):
        point = {n: p.detach().requires_grad_() for n, p in theta.items()} if mode == "first" else theta
        with torch.enable_grad():
            loss = inner_loss(sr, point, face_lr, face_pseudo, weights)
            scaled = loss * grad_scale if grad_scale is not None else loss
            grads = torch.autograd.grad(scaled, list(point.values()), create_graph=create_graph)
        if grad_scale is not None:
            grads = [g / grad_scale for g in grads]
        if before is None:
            before = loss
        theta = {n: p - inner_lr * g for (n, p), g in zip(theta.items(), grads)}
    return theta, before


def meta_forward(
    sr: nn.Module,
    masknet: nn.Module,
    disc: nn.Module | None,
    perceptual: nn.Module | None,
    batch: TaskBatch,
    config: MetaConfig,
    grad_scale: float | None = None,
    timings: dict[str, float] | None = None,
) -> MetaOutputs:
    """The generator-side objective of one meta-batch and what the discriminator step needs (see module doc).

    Terms whose weight is 0 are not computed and read 0. ``disc`` may be None when ``w_gan == 0`` and
    ``perceptual`` when ``w_lpips == 0``. ``timings``, when given, accumulates seconds spent in ``inner`` (MaskNet
    and the adaptation), ``outer_forward`` (SR of the backgrounds and every term but SSL) and ``ssl``.
    """
    if not isinstance(config, MetaConfig):
        raise TypeError(f"config must be a MetaConfig, got {type(config).__name__}")
    if config.w_gan > 0 and disc is None:
        raise ValueError("disc is None but w_gan > 0: pass the discriminator or set w_gan = 0")
    if config.w_lpips > 0 and perceptual is None:
        raise ValueError("perceptual is None but w_lpips > 0: pass metaf2n.losses.lpips_alex() or set w_lpips = 0")
    weighted = {"l1": config.w_l1, "lpips": config.w_lpips, "gan": config.w_gan, "reg": config.w_reg,
                "ssl": config.w_ssl}
    per_task: dict[str, list[torch.Tensor]] = {key: [] for key in LOSS_KEYS}
    sr_backgrounds, all_weights = [], []
    device = batch.bg_lr.device
    for t in range(batch.num_tasks):
        with timed(timings, "inner", device):
            weights = face_weights(masknet, batch.face_lr[t], batch.face_pseudo[t])
            fast, before = adapt(
                sr, weights, batch.face_lr[t], batch.face_pseudo[t], config.inner_lr, config.inner_steps,
                config.mode, create_graph=True, grad_scale=grad_scale,
            )
        with timed(timings, "outer_forward", device):
            out = _full(functional_call(sr, fast, (batch.bg_lr[t],)))
            target = batch.bg_hr_usm[t]
            zero = out.new_zeros(())
            terms = {
                "l1": (out - target).abs().mean() if config.w_l1 > 0 else zero,
                "lpips": _full(perceptual(out, target)).mean() if config.w_lpips > 0 else zero,
                "gan": gan_loss(disc(out), real=True) if config.w_gan > 0 else zero,
                "reg": masknet_regulariser(weights, config.reg_form) if config.w_reg > 0 else zero,
                "ssl": zero,
            }
        if config.w_ssl > 0:
            with timed(timings, "ssl", device):
                use_hr = config.ssl_target == "hr"
                ssl_ref = batch.bg_hr[t] if use_hr else batch.bg_hr_usm[t]
                edges = batch.bg_edges if use_hr else batch.bg_edges_usm  # cut from whole-crop masks
                mask = edges[t] if edges is not None else None
                terms["ssl"] = ssl_loss(out, ssl_ref, mask, **config.ssl_kwargs())
        terms["total"] = sum(weighted[key] * terms[key] for key in weighted)
        terms["inner"] = before.detach()
        for key in LOSS_KEYS:
            per_task[key].append(terms[key])
        sr_backgrounds.append(out.detach())
        all_weights.append(weights.detach())
    losses = {key: torch.stack(values).mean() for key, values in per_task.items()}
    return MetaOutputs(losses, torch.stack(sr_backgrounds), torch.stack(all_weights))


def meta_losses(
    sr: nn.Module,
    masknet: nn.Module,
    disc: nn.Module | None,
    perceptual: nn.Module | None,
    batch: TaskBatch,
    config: MetaConfig,
) -> dict[str, torch.Tensor]:
    """The loss terms of :func:`meta_forward`: ``total``, ``l1``, ``lpips``, ``gan``, ``reg``, ``ssl``, ``inner``,
    each the mean over the batch's tasks; ``total`` is differentiable w.r.t. ``sr``'s and ``masknet``'s parameters."""
    return meta_forward(sr, masknet, disc, perceptual, batch, config).losses


@torch.no_grad()
def evaluate_adaptation(
    sr: nn.Module, masknet: nn.Module, batch: TaskBatch, config: MetaConfig
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Background L1 and PSNR (RGB, SR clamped to [0, 1]) against the true HR ``bg_hr``, before and after the
    inner adaptation, averaged over tasks and patches. Also returns the images of the first task for a picture:
    ``sr_before``, ``sr_after`` (Q,3,H,W) and ``weights`` (P,1,h,w)."""
    sums = {"val_l1_before": 0.0, "val_l1_after": 0.0, "val_psnr_before": 0.0, "val_psnr_after": 0.0}
    images: dict[str, torch.Tensor] = {}
    for t in range(batch.num_tasks):
        weights = face_weights(masknet, batch.face_lr[t], batch.face_pseudo[t])
        fast, _ = adapt(sr, weights, batch.face_lr[t], batch.face_pseudo[t], config.inner_lr, config.inner_steps,
                        "first", create_graph=False)
        fast = {n: p.detach() for n, p in fast.items()}
        hr = batch.bg_hr[t]
        before = _full(sr(batch.bg_lr[t])).clamp(0, 1)
        after = _full(functional_call(sr, fast, (batch.bg_lr[t],))).clamp(0, 1)
        for name, image in (("before", before), ("after", after)):
            sums[f"val_l1_{name}"] += (image - hr).abs().mean().item()
            mse = (image - hr).pow(2).flatten(1).mean(1).clamp_min(1e-12)
            sums[f"val_psnr_{name}"] += (10 * torch.log10(1 / mse)).mean().item()
        if t == 0:
            images = {"sr_before": before, "sr_after": after, "weights": weights}
    return {key: value / batch.num_tasks for key, value in sums.items()}, images
