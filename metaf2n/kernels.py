"""Blur kernels of Real-ESRGAN's degradation model, generated in PyTorch.

Every kernel is a square ``(k, k)`` float32 tensor with odd ``k`` that sums to 1.
Gaussian-family kernels are non-negative; sinc kernels have small negative lobes.

Kernel families (``q = [x y] Sigma^-1 [x y]^T`` with
``Sigma = R(theta) diag(sigma_x^2, sigma_y^2) R(theta)^T``):

* ``iso`` / ``aniso``: Gaussian ``exp(-q / 2)``;
* ``generalized_iso`` / ``generalized_aniso``: ``exp(-q^beta / 2)`` (beta = 1 is Gaussian);
* ``plateau_iso`` / ``plateau_aniso``: ``1 / (1 + q^beta)``;
* ``sinc``: circularly symmetric low-pass filter ``w J1(w r) / (2 pi r)`` with
  cut-off ``w`` in radians (pi keeps every frequency).

The random draw follows the official Real-ESRGAN sampler: sigmas uniform in
``sigma_range`` (drawn independently for x and y in the anisotropic case),
rotation uniform in [-pi, pi], and beta drawn with probability 1/2 from
``[beta_lo, 1]`` and otherwise from ``[1, beta_hi]``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

KERNEL_TYPES = (
    "iso",
    "aniso",
    "generalized_iso",
    "generalized_aniso",
    "plateau_iso",
    "plateau_aniso",
)


def _check_size(size: int) -> None:
    if not isinstance(size, int) or size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size must be a positive odd int, got {size!r}")


def _offset_grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel offsets from the kernel centre: ``(x, y)``, each ``(size, size)`` float64."""
    axis = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    return x, y


def _quadratic_form(size: int, sigma_x: float, sigma_y: float, theta: float) -> torch.Tensor:
    """``q = v^T Sigma^-1 v`` for every offset ``v`` of a ``(size, size)`` grid."""
    if sigma_x <= 0 or sigma_y <= 0:
        raise ValueError(f"sigma_x and sigma_y must be > 0, got {sigma_x}, {sigma_y}")
    x, y = _offset_grid(size)
    cos, sin = math.cos(theta), math.sin(theta)
    # Rotating the offsets into the kernel's principal axes diagonalises Sigma.
    u = cos * x + sin * y
    v = -sin * x + cos * y
    return (u / sigma_x) ** 2 + (v / sigma_y) ** 2


def _normalised(kernel: torch.Tensor) -> torch.Tensor:
    return (kernel / kernel.sum()).to(torch.float32)


def gaussian_kernel(size: int, sigma_x: float, sigma_y: float | None = None, theta: float = 0.0) -> torch.Tensor:
    """Anisotropic Gaussian kernel (isotropic when ``sigma_y`` is None), ``(size, size)``."""
    _check_size(size)
    q = _quadratic_form(size, sigma_x, sigma_x if sigma_y is None else sigma_y, theta)
    return _normalised(torch.exp(-0.5 * q))


def generalized_gaussian_kernel(
    size: int, sigma_x: float, sigma_y: float | None = None, theta: float = 0.0, beta: float = 1.0
) -> torch.Tensor:
    """Generalised Gaussian kernel ``exp(-q^beta / 2)``, ``(size, size)``; beta > 0."""
    _check_size(size)
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    q = _quadratic_form(size, sigma_x, sigma_x if sigma_y is None else sigma_y, theta)
    return _normalised(torch.exp(-0.5 * q.pow(beta)))


def plateau_kernel(
    size: int, sigma_x: float, sigma_y: float | None = None, theta: float = 0.0, beta: float = 1.0
) -> torch.Tensor:
    """Plateau-shaped kernel ``1 / (1 + q^beta)``, ``(size, size)``; beta > 0."""
    _check_size(size)
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    q = _quadratic_form(size, sigma_x, sigma_x if sigma_y is None else sigma_y, theta)
    return _normalised(1.0 / (1.0 + q.pow(beta)))


def sinc_kernel(size: int, cutoff: float) -> torch.Tensor:
    """Circular low-pass (2-D sinc) kernel, ``(size, size)``; ``cutoff`` in (0, pi] radians."""
    _check_size(size)
    if not 0 < cutoff <= math.pi + 1e-9:
        raise ValueError(f"cutoff must be in (0, pi], got {cutoff}")
    x, y = _offset_grid(size)
    r = torch.sqrt(x**2 + y**2)
    centre = r == 0
    safe_r = torch.where(centre, torch.ones_like(r), r)
    kernel = cutoff * torch.special.bessel_j1(cutoff * safe_r) / (2 * math.pi * safe_r)
    # Limit of the expression above as r -> 0.
    kernel = torch.where(centre, torch.full_like(r, cutoff**2 / (4 * math.pi)), kernel)
    return _normalised(kernel)


def pad_kernel(kernel: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad a ``(k, k)`` kernel symmetrically to ``(size, size)``; ``size - k`` must be even."""
    k = kernel.shape[-1]
    if size < k or (size - k) % 2:
        raise ValueError(f"size must be >= {k} with an even difference, got {size}")
    p = (size - k) // 2
    return torch.nn.functional.pad(kernel, (p, p, p, p))


# ----------------------------------------------------------------------------- random draws


def uniform(generator: torch.Generator, low: float, high: float) -> float:
    """One float uniform in ``[low, high)`` drawn from ``generator``."""
    return low + (high - low) * torch.rand((), generator=generator, dtype=torch.float64).item()


def bernoulli(generator: torch.Generator, p: float) -> bool:
    """True with probability ``p``."""
    return torch.rand((), generator=generator, dtype=torch.float64).item() < p


def choice(generator: torch.Generator, options: Sequence, probs: Sequence[float] | None = None):
    """One element of ``options``, uniformly or with the given (unnormalised) probabilities."""
    if len(options) == 0:
        raise ValueError("options must not be empty")
    if probs is None:
        index = int(torch.randint(len(options), (), generator=generator).item())
    else:
        if len(probs) != len(options) or min(probs) < 0 or sum(probs) <= 0:
            raise ValueError(f"probs must be {len(options)} non-negative weights with a positive sum, got {probs}")
        weights = torch.tensor(probs, dtype=torch.float64)
        index = int(torch.multinomial(weights, 1, generator=generator).item())
    return options[index]


def _random_beta(generator: torch.Generator, beta_range: Sequence[float]) -> float:
    low, high = beta_range
    if bernoulli(generator, 0.5):
        return uniform(generator, low, 1.0)
    return uniform(generator, 1.0, high)


def random_mixed_kernel(
    generator: torch.Generator,
    size: int,
    kernel_types: Sequence[str],
    kernel_probs: Sequence[float],
    sigma_range: Sequence[float],
    betag_range: Sequence[float],
    betap_range: Sequence[float],
) -> tuple[torch.Tensor, str]:
    """Draw one kernel of a type chosen from ``kernel_types`` (names in :data:`KERNEL_TYPES`).

    Returns ``(kernel (size, size), type name)``.
    """
    kind = choice(generator, list(kernel_types), kernel_probs)
    if kind not in KERNEL_TYPES:
        raise ValueError(f"kernel type must be one of {KERNEL_TYPES}, got {kind!r}")
    sigma_x = uniform(generator, *sigma_range)
    if not kind.endswith("aniso"):
        sigma_y, theta = sigma_x, 0.0
    else:
        sigma_y = uniform(generator, *sigma_range)
        theta = uniform(generator, -math.pi, math.pi)
    if kind in ("iso", "aniso"):
        return gaussian_kernel(size, sigma_x, sigma_y, theta), kind
    if kind.startswith("generalized"):
        beta = _random_beta(generator, betag_range)
        return generalized_gaussian_kernel(size, sigma_x, sigma_y, theta, beta), kind
    beta = _random_beta(generator, betap_range)
    return plateau_kernel(size, sigma_x, sigma_y, theta, beta), kind


def random_sinc_cutoff(generator: torch.Generator, size: int) -> float:
    """Cut-off for a blur-stage sinc kernel: U[pi/3, pi] below size 13, else U[pi/5, pi] (official rule)."""
    low = math.pi / 3 if size < 13 else math.pi / 5
    return uniform(generator, low, math.pi)
