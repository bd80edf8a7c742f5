"""Typed wrappers around the compiled ``torch.ops.metaf2n`` operators.

Loading this module loads ``metaf2n._C`` (whose C++ static initialisers register the schemas and the CPU / CUDA
kernels) and adds what the dispatcher needs from Python: fake (meta) kernels for ``torch.compile`` and
``torch.library.opcheck``, the autograd formulas, and the autocast rule (run in float32).

Positions are ``(N, 3)`` integer rows ``(b, y, x)``; graphs have ``K = search ** 2`` columns ordered row-major over
the offsets ``(dy, dx)`` in ``[-s, s] ** 2``. The maths is stated in DESIGN.md and implemented independently in
:mod:`metaf2n.reference`.
"""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (registers torch.ops.metaf2n.*)

__all__ = ["has_cuda_kernels", "similarity_graph", "ssl_loss"]

PADDINGS = ("image", "window")
PATHS = ("auto", "direct", "dense")


def has_cuda_kernels() -> bool:
    """Whether this build of the extension contains the CUDA kernels."""
    return bool(torch.ops.metaf2n.has_cuda_kernels())


def similarity_graph(
    image: torch.Tensor,
    positions: torch.Tensor,
    search: int = 25,
    patch: int = 9,
    h: float = 0.004,
    padding: str = "image",
    path: str = "auto",
) -> torch.Tensor:
    """Normalised self-similarity rows of ``image`` (B, C, H, W) at ``positions`` (N, 3): returns (N, search**2).

    ``path`` picks the implementation: ``"direct"`` (one patch loop per row), ``"dense"`` (box filters) or
    ``"auto"`` (on the CPU the cheaper of the two by a measured work estimate; on CUDA the direct kernels, as the
    dense ones have not been timed on a GPU yet). They agree to rounding.
    """
    return torch.ops.metaf2n.similarity_graph(image, positions, search, patch, h, padding, path)


def ssl_loss(
    sr: torch.Tensor,
    hr: torch.Tensor,
    positions: torch.Tensor,
    search: int = 25,
    patch: int = 9,
    h: float = 0.004,
    kl_weight: float = 1000.0,
    l1_weight: float = 1000.0,
    padding: str = "image",
    path: str = "auto",
) -> torch.Tensor:
    """Fused ``kl_weight * KL(S_hr || S_sr) + l1_weight * |S_sr - S_hr|`` averaged over N x K; a scalar.

    When ``sr`` needs a gradient, the loss and its gradient are computed in one pass (``ssl_loss_with_grad``), which
    keeps one image-sized gradient until backward and saves recomputing both graphs there. ``path`` as in
    :func:`similarity_graph`.
    """
    if sr.requires_grad and torch.is_grad_enabled():
        loss, _ = torch.ops.metaf2n.ssl_loss_with_grad(
            sr, hr, positions, search, patch, h, kl_weight, l1_weight, padding, path
        )
        return loss
    return torch.ops.metaf2n.ssl_loss(sr, hr, positions, search, patch, h, kl_weight, l1_weight, padding, path)


# --- fake kernels: shapes and dtypes only ---------------------------------------------------------------------


def _check_device(tensor: torch.Tensor, name: str, image: torch.Tensor, image_name: str) -> None:
    # Mixed devices would otherwise dispatch to the fake kernel and silently return a meta tensor.
    if tensor.device != image.device:
        raise ValueError(f"{name} must be on {image_name}'s device {image.device}, got {tensor.device}")


@torch.library.register_fake("metaf2n::similarity_graph")
def _similarity_graph_fake(image, positions, search, patch, h, padding, path="auto"):
    _check_device(positions, "positions", image, "image")
    torch._check(positions.dim() == 2 and positions.shape[1] == 3)
    return image.new_empty((positions.shape[0], search * search))


@torch.library.register_fake("metaf2n::similarity_graph_backward")
def _similarity_graph_backward_fake(grad_rows, rows, image, positions, search, patch, h, padding, path="auto"):
    for tensor, name in ((grad_rows, "grad_rows"), (rows, "rows"), (positions, "positions")):
        _check_device(tensor, name, image, "image")
    return torch.empty_like(image, memory_format=torch.contiguous_format)


@torch.library.register_fake("metaf2n::ssl_loss")
def _ssl_loss_fake(sr, hr, positions, search, patch, h, kl_weight, l1_weight, padding, path="auto"):
    _check_device(hr, "hr", sr, "sr")
    _check_device(positions, "positions", sr, "sr")
    return sr.new_empty(())


@torch.library.register_fake("metaf2n::ssl_loss_backward")
def _ssl_loss_backward_fake(grad, sr, hr, positions, search, patch, h, kl_weight, l1_weight, padding, path="auto"):
    for tensor, name in ((grad, "grad"), (hr, "hr"), (positions, "positions")):
        _check_device(tensor, name, sr, "sr")
    return torch.empty_like(sr, memory_format=torch.contiguous_format)


@torch.library.register_fake("metaf2n::ssl_loss_with_grad")
def _ssl_loss_with_grad_fake(sr, hr, positions, search, patch, h, kl_weight, l1_weight, padding, path="auto"):
    _check_device(hr, "hr", sr, "sr")
    _check_device(positions, "positions", sr, "sr")
    return sr.new_empty(()), torch.empty_like(sr, memory_format=torch.contiguous_format)


# --- autograd -------------------------------------------------------------------------------------------------


class _FirstDerivativeOnly(torch.autograd.Function):
    """``scale * gradient`` where ``gradient`` is an op's derivative w.r.t. ``wrt``, used only when a backward runs
    with ``create_graph=True``: differentiable in ``scale`` (the upstream gradient), and a clear error, not a silent
    zero, when the second derivative w.r.t. ``wrt`` is asked for."""

    @staticmethod
    def forward(ctx, scale, gradient, wrt, op_name):
        ctx.save_for_backward(gradient)
        ctx.op_name = op_name
        ctx.scale_shape = scale.shape
        return scale * gradient

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.needs_input_grad[2]:
            raise RuntimeError(
                f"second derivatives of {ctx.op_name} are not implemented: its gradient was differentiated again "
                "(a backward with create_graph=True followed by another backward through it). Keep the SSL out of "
                "double-backward paths, e.g. outside the inner loop of a second-order meta-step."
            )
        (gradient,) = ctx.saved_tensors
        grad_scale = None
        if ctx.needs_input_grad[0]:
            grad_scale = (grad_out * gradient).sum().reshape(ctx.scale_shape)
        return grad_scale, None, None, None


def _guard_double_backward(scale, gradient, wrt, op_name):
    """``scale * gradient``, guarded by :class:`_FirstDerivativeOnly` when the backward builds a graph."""
    if torch.is_grad_enabled() and (wrt.requires_grad or scale.requires_grad):
        return _FirstDerivativeOnly.apply(scale, gradient, wrt, op_name)
    return scale * gradient


class _NoDoubleBackward(torch.autograd.Function):
    """Passes ``value`` through; any derivative of it raises (an op whose backward has no derivative of its own)."""

    @staticmethod
    def forward(ctx, value, op_name, *inputs):
        ctx.op_name = op_name
        return value.clone()

    @staticmethod
    def backward(ctx, grad_out):
        raise RuntimeError(
            f"second derivatives of {ctx.op_name} are not implemented: its gradient was differentiated again "
            "(a backward with create_graph=True followed by another backward through it)."
        )


def _graph_setup_context(ctx, inputs, output):
    image, positions, search, patch, h, padding, path = inputs
    ctx.save_for_backward(image, positions, output)
    ctx.params = (search, patch, h, padding, path)


def _graph_backward(ctx, grad_rows):
    image, positions, rows = ctx.saved_tensors
    grad_image = None
    if ctx.needs_input_grad[0]:
        building_graph = torch.is_grad_enabled() and (image.requires_grad or grad_rows.requires_grad)
        with torch.no_grad():
            grad_image = torch.ops.metaf2n.similarity_graph_backward(grad_rows, rows, image, positions, *ctx.params)
        if building_graph:
            grad_image = _NoDoubleBackward.apply(grad_image, "metaf2n.similarity_graph", image, grad_rows)
    return grad_image, None, None, None, None, None, None


torch.library.register_autograd(
    "metaf2n::similarity_graph", _graph_backward, setup_context=_graph_setup_context
)


def _loss_setup_context(ctx, inputs, output):
    sr, hr, positions, search, patch, h, kl_weight, l1_weight, padding, path = inputs
    ctx.save_for_backward(sr, hr, positions)
    ctx.params = (search, patch, h, kl_weight, l1_weight, padding, path)


def _loss_backward(ctx, grad):
    sr, hr, positions = ctx.saved_tensors
    grad_sr = None
    if ctx.needs_input_grad[0]:
        if torch.is_grad_enabled() and (sr.requires_grad or grad.requires_grad):
            with torch.no_grad():  # the backward is linear in grad: differentiate it through the scale only
                unit = torch.ops.metaf2n.ssl_loss_backward(torch.ones_like(grad), sr, hr, positions, *ctx.params)
            grad_sr = _FirstDerivativeOnly.apply(grad, unit, sr, "metaf2n.ssl_loss")
        else:
            grad_sr = torch.ops.metaf2n.ssl_loss_backward(grad, sr, hr, positions, *ctx.params)
    # hr is the target: it never receives a gradient.
    return grad_sr, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("metaf2n::ssl_loss", _loss_backward, setup_context=_loss_setup_context)


def _loss_with_grad_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1], inputs[0])
    # The second output is the first derivative itself: it carries no gradient (no double backward).
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _loss_with_grad_backward(ctx, grad_loss, grad_of_grad):
    grad_sr, sr = ctx.saved_tensors
    grad = None if grad_loss is None else _guard_double_backward(grad_loss, grad_sr, sr, "metaf2n.ssl_loss")
    return grad, None, None, None, None, None, None, None, None, None


torch.library.register_autograd(
    "metaf2n::ssl_loss_with_grad", _loss_with_grad_backward, setup_context=_loss_with_grad_setup_context
)


# --- autocast: the maths needs float32 (h = 0.004 amplifies distance errors 250-fold) -------------------------

for _op in ("metaf2n::similarity_graph", "metaf2n::ssl_loss", "metaf2n::ssl_loss_with_grad"):
    for _device in ("cpu", "cuda"):
        torch.library.register_autocast(_op, _device, torch.float32)
