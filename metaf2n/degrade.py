"""Real-ESRGAN's second-order degradation model in pure PyTorch (batched, CPU or GPU).

Pipeline (images NCHW RGB float in [0, 1], scale ``s`` = 4)::

    blur(k1) -> resize(scale1, mode1) -> noise1 -> clamp -> JPEG(q1)
    -> [blur(k2), p = 0.8] -> resize to (H/s * scale2, mode2) -> noise2 -> clamp
    -> either  resize to H/s + sinc -> clamp -> JPEG(q2)
       or      clamp -> JPEG(q2) -> resize to H/s + sinc          (50/50)
    -> clamp, round to 8 bits: (x * 255).round() / 255

:func:`sample_degradation` draws every random choice of that pipeline once (one task
models one photo) into a :class:`DegradationParams`; :func:`apply_degradation` applies it
to any batch, so faces and backgrounds of a task share blur kernels, resize scales and
modes, noise type and level, and JPEG qualities. Relative resize scales act on each
image's own size, so 128-pixel faces and 400-pixel backgrounds can share one draw.

Defaults are the official ``options/train_realesrgan_x4plus.yml`` of Real-ESRGAN together
with the kernel sampling of its ``RealESRGANDataset`` (kernel sizes 7..21 odd; sinc
cut-off U[pi/3, pi] for sizes < 13, else U[pi/5, pi]; final sinc cut-off U[pi/3, pi]).

Where this module differs from the official code:

* the official model draws noise sigma/scale, grey-noise flag and JPEG quality per image
  of the batch; here they are drawn once per task (as the MetaF2N data generator does for
  JPEG quality). Noise *realisations* still differ per image;
* JPEG is real libjpeg (OpenCV's codec, as BasicSR's ``add_jpg_compression``) at an integer quality, round(U[30, 95]),
  instead of BasicSR's DiffJPEG at a float quality; it runs on the CPU;
* resizes use explicit output sizes ``max(1, floor(H * scale))`` instead of
  ``scale_factor``, so tiny images never collapse to zero pixels;
* filters use reflect padding like BasicSR's ``filter2D``, falling back to replicate
  padding when the image is too small for reflect padding;
* kernels keep their own size (7..21) instead of being zero-padded to 21, which gives
  the same result with reflect padding;
* kernels (blur, second blur, final sinc) are drawn once per task, not per image, like
  every other choice;
* the explicit resize sizes also remove the official first-stage ``scale_factor``
  misregistration (PyTorch maps coordinates with the requested factor, not the realised
  size ratio), which reaches 3.4 px at the far edge of a 400 px row at scale 0.174;
* images are rounded to 8 bits before and after each JPEG step (a real codec works on
  8-bit images), whereas the official differentiable JPEG does not round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from metaf2n.kernels import (
    KERNEL_TYPES,
    bernoulli,
    choice,
    random_mixed_kernel,
    random_sinc_cutoff,
    sinc_kernel,
    uniform,
)

RESIZE_MODES = ("area", "bilinear", "bicubic")
NOISE_KINDS = ("gaussian", "poisson", "none")


@dataclass(frozen=True)
class DegradationConfig:
    """Ranges and probabilities of the degradation model (defaults: Real-ESRGAN x4plus).

    Noise ranges: Gaussian sigma on the 0..255 scale; Poisson scale multiplies the shot
    noise. Resize probabilities are for (up, down, keep).
    """

    scale: int = 4
    kernel_sizes: tuple[int, ...] = (7, 9, 11, 13, 15, 17, 19, 21)
    kernel_types: tuple[str, ...] = KERNEL_TYPES
    resize_modes: tuple[str, ...] = RESIZE_MODES
    # first degradation
    kernel_probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)
    resize_range: tuple[float, float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 30.0)
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[float, float] = (30.0, 95.0)
    # second degradation
    second_blur_prob: float = 0.8
    kernel_probs2: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob2: float = 0.1
    blur_sigma2: tuple[float, float] = (0.2, 1.5)
    betag_range2: tuple[float, float] = (0.5, 4.0)
    betap_range2: tuple[float, float] = (1.0, 2.0)
    resize_prob2: tuple[float, float, float] = (0.3, 0.4, 0.3)
    resize_range2: tuple[float, float] = (0.3, 1.2)
    gaussian_noise_prob2: float = 0.5
    noise_range2: tuple[float, float] = (1.0, 25.0)
    poisson_scale_range2: tuple[float, float] = (0.05, 2.5)
    gray_noise_prob2: float = 0.4
    jpeg_range2: tuple[float, float] = (30.0, 95.0)
    # final stage
    final_sinc_prob: float = 0.8

    def __post_init__(self) -> None:
        if not isinstance(self.scale, int) or self.scale < 1:
            raise ValueError(f"scale must be a positive int, got {self.scale!r}")
        if not self.kernel_sizes or any(k < 1 or k % 2 == 0 for k in self.kernel_sizes):
            raise ValueError(f"kernel_sizes must be positive odd ints, got {self.kernel_sizes}")
        bad_modes = set(self.resize_modes) - set(RESIZE_MODES)
        if not self.resize_modes or bad_modes:
            raise ValueError(f"resize_modes must be a non-empty subset of {RESIZE_MODES}, got {self.resize_modes}")
        for name in ("jpeg_range", "jpeg_range2"):
            low, high = getattr(self, name)
            if not 1 <= low <= high <= 100:
                raise ValueError(f"{name} must satisfy 1 <= low <= high <= 100, got {(low, high)}")


REAL_ESRGAN_X4PLUS = DegradationConfig()


@dataclass(frozen=True)
class NoiseParams:
    """Noise of one stage: ``kind`` in :data:`NOISE_KINDS`; ``level`` is the Gaussian sigma
    (0..255 scale) or the Poisson scale; ``gray`` shares one noise map across channels."""

    kind: str = "none"
    level: float = 0.0
    gray: bool = False

    def __post_init__(self) -> None:
        if self.kind not in NOISE_KINDS:
            raise ValueError(f"noise kind must be one of {NOISE_KINDS}, got {self.kind!r}")
        if self.level < 0:
            raise ValueError(f"noise level must be >= 0, got {self.level}")


@dataclass(frozen=True, eq=False)
class StageParams:
    """One degradation stage. ``kernel`` is ``(k, k)`` float32 summing to 1, or None for no blur.

    ``resize_scale`` is relative: stage 1 scales the input size, stage 2 scales ``H / s``.
    """

    kernel: torch.Tensor | None
    kernel_type: str
    resize_scale: float
    resize_mode: str
    noise: NoiseParams
    jpeg_quality: int

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.resize_scale <= 0:
            raise ValueError(f"resize_scale must be > 0, got {self.resize_scale}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")


@dataclass(frozen=True, eq=False)
class DegradationParams:
    """Every random draw of one task's degradation.

    ``sinc_kernel`` is None when the final sinc filter is skipped; ``jpeg_last`` selects the
    final order (True: resize + sinc, then JPEG). ``noise_seed`` seeds the noise
    realisations when :func:`apply_degradation` gets no generator.
    """

    first: StageParams
    second: StageParams
    final_resize_mode: str
    sinc_kernel: torch.Tensor | None
    jpeg_last: bool
    noise_seed: int
    scale: int = 4

    def without_noise(self) -> "DegradationParams":
        """The same degradation with both noise stages disabled (deterministic output)."""
        return replace(
            self,
            first=replace(self.first, noise=NoiseParams()),
            second=replace(self.second, noise=NoiseParams()),
        )

    def describe(self) -> str:
        """One-line human-readable summary (for logs and galleries)."""

        def stage(s: StageParams) -> str:
            blur = "no blur" if s.kernel is None else f"{s.kernel_type} {s.kernel.shape[-1]}px"
            noise = "no noise" if s.noise.kind == "none" else (
                f"{'grey ' if s.noise.gray else ''}{s.noise.kind} {s.noise.level:.2f}"
            )
            return f"{blur}, x{s.resize_scale:.2f} {s.resize_mode}, {noise}, q{s.jpeg_quality}"

        sinc = "no sinc" if self.sinc_kernel is None else f"sinc {self.sinc_kernel.shape[-1]}px"
        order = "resize+sinc->jpeg" if self.jpeg_last else "jpeg->resize+sinc"
        return f"[1] {stage(self.first)} | [2] {stage(self.second)} | {sinc}, {order}"


# ----------------------------------------------------------------------------- sampling


def _draw_blur_kernel(
    generator: torch.Generator,
    config: DegradationConfig,
    kernel_probs: tuple[float, ...],
    sinc_prob: float,
    sigma: tuple[float, float],
    betag: tuple[float, float],
    betap: tuple[float, float],
) -> tuple[torch.Tensor, str]:
    size = choice(generator, list(config.kernel_sizes))
    if bernoulli(generator, sinc_prob):
        return sinc_kernel(size, random_sinc_cutoff(generator, size)), "sinc"
    return random_mixed_kernel(generator, size, config.kernel_types, kernel_probs, sigma, betag, betap)


def _draw_resize_scale(
    generator: torch.Generator, probs: tuple[float, float, float], scale_range: tuple[float, float]
) -> float:
    direction = choice(generator, ["up", "down", "keep"], probs)
    if direction == "up":
        return uniform(generator, 1.0, scale_range[1])
    if direction == "down":
        return uniform(generator, scale_range[0], 1.0)
    return 1.0


def _draw_noise(
    generator: torch.Generator,
    gaussian_prob: float,
    sigma_range: tuple[float, float],
    poisson_range: tuple[float, float],
    gray_prob: float,
) -> NoiseParams:
    if bernoulli(generator, gaussian_prob):
        kind, level = "gaussian", uniform(generator, *sigma_range)
    else:
        kind, level = "poisson", uniform(generator, *poisson_range)
    return NoiseParams(kind=kind, level=level, gray=bernoulli(generator, gray_prob))


def _draw_jpeg_quality(generator: torch.Generator, quality_range: tuple[float, float]) -> int:
    return int(round(uniform(generator, *quality_range)))


def sample_degradation(
    generator: torch.Generator, config: DegradationConfig = REAL_ESRGAN_X4PLUS
) -> DegradationParams:
    """Draw one task's degradation from ``config`` using only ``generator`` (a CPU generator).

    Kernels are float32 CPU tensors; :func:`apply_degradation` moves them to the images' device.
    """
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if not isinstance(config, DegradationConfig):
        raise TypeError(f"config must be a DegradationConfig, got {type(config).__name__}")
    c = config

    kernel1, type1 = _draw_blur_kernel(
        generator, c, c.kernel_probs, c.sinc_prob, c.blur_sigma, c.betag_range, c.betap_range
    )
    first = StageParams(
        kernel=kernel1,
        kernel_type=type1,
        resize_scale=_draw_resize_scale(generator, c.resize_prob, c.resize_range),
        resize_mode=choice(generator, list(c.resize_modes)),
        noise=_draw_noise(generator, c.gaussian_noise_prob, c.noise_range, c.poisson_scale_range, c.gray_noise_prob),
        jpeg_quality=_draw_jpeg_quality(generator, c.jpeg_range),
    )

    kernel2, type2 = _draw_blur_kernel(
        generator, c, c.kernel_probs2, c.sinc_prob2, c.blur_sigma2, c.betag_range2, c.betap_range2
    )
    if not bernoulli(generator, c.second_blur_prob):
        kernel2, type2 = None, "none"
    second = StageParams(
        kernel=kernel2,
        kernel_type=type2,
        resize_scale=_draw_resize_scale(generator, c.resize_prob2, c.resize_range2),
        resize_mode=choice(generator, list(c.resize_modes)),
        noise=_draw_noise(
            generator, c.gaussian_noise_prob2, c.noise_range2, c.poisson_scale_range2, c.gray_noise_prob2
        ),
        jpeg_quality=_draw_jpeg_quality(generator, c.jpeg_range2),
    )

    final_sinc = None
    if bernoulli(generator, c.final_sinc_prob):
        size = choice(generator, list(c.kernel_sizes))
        final_sinc = sinc_kernel(size, uniform(generator, math.pi / 3, math.pi))

    return DegradationParams(
        first=first,
        second=second,
        final_resize_mode=choice(generator, list(c.resize_modes)),
        sinc_kernel=final_sinc,
        jpeg_last=bernoulli(generator, 0.5),
        noise_seed=int(torch.randint(0, 2**62, (), generator=generator).item()),
        scale=c.scale,
    )


# ----------------------------------------------------------------------------- operations


def _pad(images: torch.Tensor, pad: int) -> torch.Tensor:
    if pad == 0:
        return images
    h, w = images.shape[-2:]
    mode = "reflect" if pad < min(h, w) else "replicate"
    return F.pad(images, (pad, pad, pad, pad), mode=mode)


def filter2d(images: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Filter every channel of ``images`` (B,C,H,W) with one odd ``(k, k)`` kernel; same size out."""
    k = kernel.shape[-1]
    if kernel.dim() != 2 or kernel.shape[0] != k or k % 2 == 0:
        raise ValueError(f"kernel must be a square odd-sized 2-D tensor, got shape {tuple(kernel.shape)}")
    b, c, h, w = images.shape
    # One depthwise conv over all B*C planes is much faster on CPU than a batch of single-plane convs.
    weight = kernel.to(device=images.device, dtype=images.dtype).expand(b * c, 1, k, k)
    padded = _pad(images.reshape(1, b * c, h, w), k // 2)
    return F.conv2d(padded, weight, groups=b * c).reshape(b, c, h, w)


def gaussian_blur_separable(images: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Gaussian blur of (B,C,H,W) with an odd ``size`` and ``sigma`` (> 0), reflect padding."""
    axis = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    taps = torch.exp(-0.5 * (axis / sigma) ** 2)
    taps = (taps / taps.sum()).to(device=images.device, dtype=images.dtype)
    b, c, h, w = images.shape
    planes = b * c
    padded = _pad(images.reshape(1, planes, h, w), size // 2)
    rows = F.conv2d(padded, taps.view(1, 1, 1, size).expand(planes, 1, 1, size), groups=planes)
    return F.conv2d(rows, taps.view(1, 1, size, 1).expand(planes, 1, size, 1), groups=planes).reshape(b, c, h, w)


def resize(images: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize (B,C,H,W) to ``size`` with ``mode`` in :data:`RESIZE_MODES` (no antialias, like the official code)."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"mode must be one of {RESIZE_MODES}, got {mode!r}")
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    if mode == "area":
        return F.interpolate(images, size=size, mode="area")
    return F.interpolate(images, size=size, mode=mode, align_corners=False)


def _randn_like(images: torch.Tensor, channels: int, generator: torch.Generator) -> torch.Tensor:
    b, _, h, w = images.shape
    noise = torch.randn((b, channels, h, w), generator=generator, device=generator.device, dtype=torch.float32)
    return noise.to(device=images.device, dtype=images.dtype)


def _to_gray(images: torch.Tensor) -> torch.Tensor:
    r, g, b = images.unbind(dim=1)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def _poisson_noise(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shot noise of (B,C,H,W) images; the photon count per image follows BasicSR:
    2^ceil(log2(number of distinct 8-bit values))."""
    levels = torch.clamp((images * 255.0).round(), 0, 255)
    quantised = levels / 255.0
    b = images.shape[0]
    # Distinct 8-bit values per image, via one histogram over (image index, level) bins.
    bins = levels.reshape(b, -1).long() + 256 * torch.arange(b, device=images.device).unsqueeze(1)
    distinct = (torch.bincount(bins.reshape(-1), minlength=256 * b).view(b, 256) > 0).sum(dim=1)
    vals = torch.pow(2.0, torch.ceil(torch.log2(distinct.to(images.dtype)))).view(-1, 1, 1, 1)
    rates = (quantised * vals).to(device=generator.device, dtype=torch.float32)
    counts = torch.poisson(rates, generator=generator).to(device=images.device, dtype=images.dtype)
    return counts / vals - quantised


def add_noise(images: torch.Tensor, noise: NoiseParams, generator: torch.Generator) -> torch.Tensor:
    """Add one stage's noise to (B,3,H,W) images (fresh realisation per image) and clamp to [0, 1]."""
    if noise.kind == "none" or noise.level == 0:
        return images.clamp(0, 1)
    channels = images.shape[1]
    if noise.kind == "gaussian":
        values = _randn_like(images, 1 if noise.gray else channels, generator) * (noise.level / 255.0)
    else:
        values = _poisson_noise(_to_gray(images) if noise.gray else images, generator) * noise.level
    return (images + values.expand_as(images)).clamp(0, 1)


def jpeg_compress(images: torch.Tensor, quality: int) -> torch.Tensor:
    """Real JPEG round trip of (B,3,H,W) images at integer ``quality`` (1..100); returns 8-bit values."""
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    as_bytes = (images.clamp(0, 1) * 255.0).round().to(device="cpu", dtype=torch.uint8)
    decoded = []
    for image in as_bytes.permute(0, 2, 3, 1).numpy():  # RGB HWC; OpenCV's codec works in BGR order
        ok, encoded = cv2.imencode(".jpg", np.ascontiguousarray(image[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
        if not ok:
            raise RuntimeError("OpenCV failed to encode a JPEG")
        decoded.append(torch.from_numpy(np.ascontiguousarray(cv2.imdecode(encoded, cv2.IMREAD_COLOR)[..., ::-1])))
    return torch.stack(decoded).permute(0, 3, 1, 2).to(device=images.device, dtype=images.dtype) / 255.0


def usm_sharpen(img: torch.Tensor, weight: float = 0.5, radius: int = 50, threshold: float = 10) -> torch.Tensor:
    """Unsharp masking as Real-ESRGAN's ``USMSharp`` (B,C,H,W) in [0, 1] -> same shape, in [0, 1].

    Gaussian of size ``radius`` (+1 if even) with OpenCV's default sigma for that size,
    ``0.3 * ((size - 1) / 2 - 1) + 0.8`` (8.0 for the default 51); ``residual = img - blur``;
    a soft mask (the blurred indicator of ``|residual| * 255 > threshold``) blends
    ``clamp(img + weight * residual)`` with ``img``.
    """
    _check_images(img, "img")
    if radius < 1:
        raise ValueError(f"radius must be >= 1, got {radius}")
    size = radius + 1 if radius % 2 == 0 else radius
    sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    blur = gaussian_blur_separable(img, size, sigma)
    residual = img - blur
    mask = (residual.abs() * 255 > threshold).to(img.dtype)
    soft_mask = gaussian_blur_separable(mask, size, sigma)
    sharp = (img + weight * residual).clamp(0, 1)
    return soft_mask * sharp + (1 - soft_mask) * img


# ----------------------------------------------------------------------------- pipeline


def _check_images(images: torch.Tensor, name: str = "images") -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{name} must have shape (B, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor in [0, 1], got {images.dtype}")


def _blur_resize_noise(
    images: torch.Tensor, stage: StageParams, size: tuple[int, int], generator: torch.Generator
) -> torch.Tensor:
    out = images if stage.kernel is None else filter2d(images, stage.kernel)
    out = resize(out, size, stage.resize_mode)
    return add_noise(out, stage.noise, generator)


def _resize_and_sinc(images: torch.Tensor, params: DegradationParams, size: tuple[int, int]) -> torch.Tensor:
    out = resize(images, size, params.final_resize_mode)
    return out if params.sinc_kernel is None else filter2d(out, params.sinc_kernel)


def apply_degradation(
    params: DegradationParams, images: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Degrade (B,3,H,W) images in [0, 1] into (B,3,H//s,W//s) 8-bit-valued LR images in [0, 1].

    Noise realisations are drawn from ``generator`` (any device) or, when it is None, from a
    generator seeded with ``params.noise_seed``; each image gets its own realisation.
    """
    if not isinstance(params, DegradationParams):
        raise TypeError(f"params must be a DegradationParams, got {type(params).__name__}")
    _check_images(images)
    s = params.scale
    h, w = images.shape[-2:]
    if h < s or w < s:
        raise ValueError(f"images must be at least {s}x{s} pixels, got {h}x{w}")
    if generator is None:
        generator = torch.Generator().manual_seed(params.noise_seed)
    elif not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")

    def scaled(base_h: float, base_w: float, factor: float) -> tuple[int, int]:
        return max(1, int(base_h * factor)), max(1, int(base_w * factor))

    out = _blur_resize_noise(images, params.first, scaled(h, w, params.first.resize_scale), generator)
    out = jpeg_compress(out, params.first.jpeg_quality)
    out = _blur_resize_noise(out, params.second, scaled(h / s, w / s, params.second.resize_scale), generator)

    lr_size = (h // s, w // s)
    if params.jpeg_last:
        out = jpeg_compress(_resize_and_sinc(out, params, lr_size), params.second.jpeg_quality)
    else:
        out = _resize_and_sinc(jpeg_compress(out, params.second.jpeg_quality), params, lr_size)
    return torch.clamp((out * 255.0).round(), 0, 255) / 255.0
