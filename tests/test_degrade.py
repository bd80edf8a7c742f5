"""Blur kernels, the second-order degradation pipeline and USM sharpening."""

import math
from dataclasses import replace

import cv2
import numpy as np
import pytest
import torch
from scipy import special

from metaf2n import kernels
from metaf2n.degrade import (
    REAL_ESRGAN_X4PLUS,
    DegradationConfig,
    DegradationParams,
    NoiseParams,
    StageParams,
    add_noise,
    apply_degradation,
    filter2d,
    jpeg_compress,
    sample_degradation,
    usm_sharpen,
)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def smooth_images(batch=2, size=64, seed=0):
    """Smooth colourful test images in [0, 1]: low-frequency noise upsampled."""
    low = torch.rand(batch, 3, size // 8, size // 8, generator=gen(seed))
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def identity_params(quality=100, noise=None):
    """A pipeline with no blur, no intermediate rescaling and no sinc filter."""
    noise = NoiseParams() if noise is None else noise
    stage = StageParams(kernel=None, kernel_type="none", resize_scale=1.0, resize_mode="area", noise=noise, jpeg_quality=quality)
    return DegradationParams(
        first=stage, second=stage, final_resize_mode="area", sinc_kernel=None, jpeg_last=True, noise_seed=0
    )


# ----------------------------------------------------------------------------- kernels


@pytest.mark.parametrize(
    "make",
    [
        lambda: kernels.gaussian_kernel(21, 2.0),
        lambda: kernels.gaussian_kernel(15, 0.5, 2.5, 0.7),
        lambda: kernels.generalized_gaussian_kernel(13, 1.5, 3.0, -1.0, beta=0.6),
        lambda: kernels.plateau_kernel(7, 1.0, 2.0, 2.0, beta=1.7),
        lambda: kernels.sinc_kernel(11, math.pi / 4),
    ],
)
def test_kernels_are_normalised_odd_squares(make):
    k = make()
    assert k.dtype == torch.float32 and k.dim() == 2 and k.shape[0] == k.shape[1] and k.shape[0] % 2 == 1
    assert abs(k.sum().item() - 1) < 1e-5
    assert torch.allclose(k, k.flip(0, 1), atol=1e-7)  # point-symmetric: correlation == convolution


def test_gaussian_kernel_matches_closed_form_and_orientation():
    size, sx, sy, theta = 9, 1.2, 2.5, 0.4
    k = kernels.gaussian_kernel(size, sx, sy, theta).double()
    axis = np.arange(size) - size // 2
    xx, yy = np.meshgrid(axis, axis)  # xx varies along columns
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    cov_inv = np.linalg.inv(rot @ np.diag([sx**2, sy**2]) @ rot.T)
    grid = np.stack([xx, yy], -1)
    ref = np.exp(-0.5 * np.einsum("...i,ij,...j->...", grid, cov_inv, grid))
    assert np.allclose(k.numpy(), ref / ref.sum(), atol=1e-7)
    # sigma_x is the spread along image columns (x); rotating by 90 degrees swaps the axes.
    wide = kernels.gaussian_kernel(21, 3.0, 1.0, 0.0)
    assert wide[10, 13] > wide[13, 10]
    assert torch.allclose(kernels.gaussian_kernel(21, 3.0, 1.0, math.pi / 2), kernels.gaussian_kernel(21, 1.0, 3.0), atol=1e-7)


def test_generalized_and_plateau_shapes():
    gauss = kernels.gaussian_kernel(15, 1.7, 2.2, 0.3)
    assert torch.allclose(kernels.generalized_gaussian_kernel(15, 1.7, 2.2, 0.3, beta=1.0), gauss, atol=1e-7)
    heavy = kernels.generalized_gaussian_kernel(15, 1.7, beta=0.5)
    flat = kernels.generalized_gaussian_kernel(15, 1.7, beta=4.0)
    assert heavy[7, 0] > gauss[7, 0] > flat[7, 0]  # beta < 1: heavier tails; beta > 1: flatter top
    plateau = kernels.plateau_kernel(15, 2.0, beta=2.0).double()
    q = (np.arange(15) - 7) ** 2 / 4.0  # along the centre row, y = 0
    ref_row = 1 / (1 + q**2)
    assert np.allclose((plateau[7] / plateau[7, 7]).numpy(), ref_row, atol=1e-6)


def test_sinc_kernel_matches_bessel_formula():
    size, cutoff = 13, math.pi / 3
    axis = np.arange(size) - size // 2
    r = np.hypot(*np.meshgrid(axis, axis))
    with np.errstate(divide="ignore", invalid="ignore"):
        ref = cutoff * special.j1(cutoff * r) / (2 * np.pi * r)
    ref[size // 2, size // 2] = cutoff**2 / (4 * np.pi)
    assert np.allclose(kernels.sinc_kernel(size, cutoff).numpy(), ref / ref.sum(), atol=1e-7)
    assert kernels.sinc_kernel(21, math.pi / 5).min() < 0  # ringing lobes


def test_kernel_arguments_are_validated():
    with pytest.raises(ValueError, match="odd"):
        kernels.gaussian_kernel(8, 1.0)
    with pytest.raises(ValueError, match="beta"):
        kernels.plateau_kernel(7, 1.0, beta=0)
    with pytest.raises(ValueError, match="cutoff"):
        kernels.sinc_kernel(7, 4.0)
    with pytest.raises(ValueError, match="kernel type"):
        kernels.random_mixed_kernel(gen(), 7, ["box"], [1.0], (1, 2), (0.5, 4), (1, 2))


# ----------------------------------------------------------------------------- sampling


def test_default_config_is_the_official_x4plus_options():
    # options/train_realesrgan_x4plus.yml and RealESRGANDataset of xinntao/Real-ESRGAN
    c = REAL_ESRGAN_X4PLUS
    assert c.scale == 4 and c.kernel_sizes == tuple(range(7, 22, 2))
    assert c.kernel_types == ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
    assert c.kernel_probs == c.kernel_probs2 == (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    assert (c.sinc_prob, c.blur_sigma, c.betag_range, c.betap_range) == (0.1, (0.2, 3), (0.5, 4), (1, 2))
    assert (c.sinc_prob2, c.blur_sigma2, c.betag_range2, c.betap_range2) == (0.1, (0.2, 1.5), (0.5, 4), (1, 2))
    assert c.final_sinc_prob == 0.8 and c.second_blur_prob == 0.8
    assert (c.resize_prob, c.resize_range, c.gaussian_noise_prob, c.noise_range) == (
        (0.2, 0.7, 0.1), (0.15, 1.5), 0.5, (1, 30))
    assert (c.poisson_scale_range, c.gray_noise_prob, c.jpeg_range) == ((0.05, 3), 0.4, (30, 95))
    assert (c.resize_prob2, c.resize_range2, c.gaussian_noise_prob2, c.noise_range2) == (
        (0.3, 0.4, 0.3), (0.3, 1.2), 0.5, (1, 25))
    assert (c.poisson_scale_range2, c.gray_noise_prob2, c.jpeg_range2) == ((0.05, 2.5), 0.4, (30, 95))


def test_sampled_parameters_follow_official_ranges():
    g = gen(1)
    draws = [sample_degradation(g) for _ in range(200)]
    sizes = set()
    for p in draws:
        for stage, sigma in ((p.first, (0.2, 3.0)), (p.second, (0.2, 1.5))):
            if stage.kernel is not None:
                k = stage.kernel.shape[-1]
                sizes.add(k)
                assert stage.kernel.shape == (k, k) and k in range(7, 22, 2)
                assert abs(stage.kernel.sum().item() - 1) < 1e-5
                assert stage.kernel_type in kernels.KERNEL_TYPES + ("sinc",)
            assert 30 <= stage.jpeg_quality <= 95
            assert stage.resize_mode in ("area", "bilinear", "bicubic")
            assert stage.noise.kind in ("gaussian", "poisson")
        assert 0.15 <= p.first.resize_scale <= 1.5 and 0.3 <= p.second.resize_scale <= 1.2
        levels = {"gaussian": (1, 30), "poisson": (0.05, 3)}[p.first.noise.kind]
        assert levels[0] <= p.first.noise.level <= levels[1]
        levels = {"gaussian": (1, 25), "poisson": (0.05, 2.5)}[p.second.noise.kind]
        assert levels[0] <= p.second.noise.level <= levels[1]
        if p.sinc_kernel is not None:
            assert p.sinc_kernel.shape[-1] in range(7, 22, 2)
    assert sizes == set(range(7, 22, 2))
    # probabilities: second blur 0.8, final sinc 0.8, order 0.5, first-stage "down" 0.7
    assert 0.7 < np.mean([p.second.kernel is not None for p in draws]) < 0.9
    assert 0.7 < np.mean([p.sinc_kernel is not None for p in draws]) < 0.9
    assert 0.38 < np.mean([p.jpeg_last for p in draws]) < 0.62
    assert 0.6 < np.mean([p.first.resize_scale < 1 for p in draws]) < 0.8
    assert 0.02 < np.mean([p.first.kernel_type == "sinc" for p in draws]) < 0.2


def test_sampling_is_deterministic_under_a_seed():
    a, b, c = sample_degradation(gen(7)), sample_degradation(gen(7)), sample_degradation(gen(8))
    assert a.describe() == b.describe() and torch.equal(a.first.kernel, b.first.kernel)
    assert a.noise_seed == b.noise_seed != c.noise_seed


def test_config_and_argument_validation():
    with pytest.raises(ValueError, match="resize_modes"):
        DegradationConfig(resize_modes=("nearest",))
    with pytest.raises(ValueError, match="jpeg_range"):
        DegradationConfig(jpeg_range=(0, 95))
    with pytest.raises(TypeError, match="generator"):
        sample_degradation(0)
    params = sample_degradation(gen())
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        apply_degradation(params, torch.rand(3, 32, 32))
    with pytest.raises(TypeError, match="floating-point"):
        apply_degradation(params, torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


# ----------------------------------------------------------------------------- pipeline


@pytest.mark.parametrize("seed", range(6))
def test_output_size_range_and_8bit_values(seed):
    params = sample_degradation(gen(seed))
    faces, backgrounds = smooth_images(2, 64, seed), smooth_images(1, 128, seed)
    for images in (faces, backgrounds, smooth_images(1, 96)[..., :48]):
        lr = apply_degradation(params, images, gen(seed))
        assert lr.shape == (images.shape[0], 3, images.shape[2] // 4, images.shape[3] // 4)
        assert lr.dtype == images.dtype and lr.min() >= 0 and lr.max() <= 1
        assert torch.equal(lr * 255, (lr * 255).round())


def test_same_seed_same_output_and_noise_differs_per_image():
    params = sample_degradation(gen(3))
    params = replace(params, first=replace(params.first, noise=NoiseParams("gaussian", 20.0, False)))
    twins = smooth_images(1, 64).repeat(2, 1, 1, 1)
    a = apply_degradation(params, twins, gen(11))
    b = apply_degradation(params, twins, gen(11))
    c = apply_degradation(params, twins, gen(12))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # each image gets its own noise realisation
    assert torch.equal(apply_degradation(params, twins), apply_degradation(params, twins))  # noise_seed


def test_without_noise_identical_inputs_give_identical_outputs():
    for seed in range(4):
        params = sample_degradation(gen(seed)).without_noise()
        twins = smooth_images(1, 64, seed).repeat(3, 1, 1, 1)
        lr = apply_degradation(params, twins, gen(seed))
        assert torch.equal(lr[0], lr[1]) and torch.equal(lr[0], lr[2])
        assert torch.equal(lr, apply_degradation(params, twins, gen(seed + 100)))


def test_identity_pipeline_is_a_plain_downscale():
    # grey images: no chroma for JPEG's 4:2:0 subsampling to lose at quality 100
    images = smooth_images(2, 64)[:, :1].expand(2, 3, 64, 64)
    lr = apply_degradation(identity_params(quality=100), images)
    expected = torch.nn.functional.interpolate(images, size=(16, 16), mode="area")
    assert (lr - expected).abs().max() < 4 / 255


def test_blur_and_jpeg_quality_degrade_progressively():
    images = smooth_images(2, 64, seed=5)
    reference = torch.nn.functional.interpolate(images, size=(16, 16), mode="area")
    sharp = apply_degradation(identity_params(quality=95), images)
    strong = identity_params(quality=30)
    strong = replace(strong, first=replace(strong.first, kernel=kernels.gaussian_kernel(21, 3.0)))
    blurred = apply_degradation(strong, images)
    assert (sharp - reference).abs().mean() < (blurred - reference).abs().mean()


def test_filter2d_impulse_response_and_identity():
    image = torch.zeros(1, 3, 15, 15)
    image[..., 7, 7] = 1
    k = kernels.gaussian_kernel(7, 1.0, 2.0, 0.5)
    out = filter2d(image, k)
    assert torch.allclose(out[0, 1, 4:11, 4:11], k, atol=1e-7)
    delta = torch.zeros(5, 5)
    delta[2, 2] = 1
    rand = torch.rand(2, 3, 9, 9, generator=gen())
    assert torch.allclose(filter2d(rand, delta), rand)
    tiny = torch.rand(1, 3, 4, 4, generator=gen())
    assert filter2d(tiny, kernels.gaussian_kernel(21, 2.0)).shape == tiny.shape  # replicate fallback


def test_gaussian_noise_statistics_and_gray_noise():
    grey = torch.full((2, 3, 64, 64), 0.5)
    noisy = add_noise(grey, NoiseParams("gaussian", 10.0, gray=False), gen())
    assert abs((noisy - grey).std().item() * 255 - 10) < 0.5
    assert not torch.equal(noisy[:, 0], noisy[:, 1])
    mono = add_noise(grey, NoiseParams("gaussian", 10.0, gray=True), gen())
    assert torch.equal(mono[:, 0], mono[:, 1]) and torch.equal(mono[:, 1], mono[:, 2])
    assert not torch.equal(mono[0], mono[1])


def test_poisson_noise_statistics_and_gray_noise():
    # every 8-bit level present -> 256 "photons" per unit intensity, as in BasicSR
    levels = (torch.arange(3 * 128 * 128) % 256)[torch.randperm(3 * 128 * 128, generator=gen())]
    image = levels.float().view(1, 3, 128, 128) / 255
    residual = add_noise(image, NoiseParams("poisson", 1.0, gray=False), gen()) - image
    mid = (image > 0.3) & (image < 0.7)
    # the variance of Poisson(256 x) / 256 is x / 256
    assert abs(residual[mid].var().item() / (image[mid].mean().item() / 256) - 1) < 0.1
    assert abs(residual[mid].mean().item()) < 2e-3

    mono = add_noise(image, NoiseParams("poisson", 2.0, gray=True), gen()) - image
    unclipped = ((image + mono) > 0) & ((image + mono) < 1)
    both = unclipped[:, 0] & unclipped[:, 1]
    assert both.float().mean() > 0.5
    assert torch.allclose(mono[:, 0][both], mono[:, 1][both], atol=1e-6)


def test_jpeg_round_trip_is_8bit_and_quality_matters():
    images = smooth_images(2, 64, seed=2) * 0.8 + 0.1 * torch.rand(2, 3, 64, 64, generator=gen())
    high, low = jpeg_compress(images, 95), jpeg_compress(images, 30)
    assert high.shape == images.shape and torch.equal(high * 255, (high * 255).round())
    assert (high - images).abs().mean() < (low - images).abs().mean()
    with pytest.raises(ValueError, match="quality"):
        jpeg_compress(images, 0)


# ----------------------------------------------------------------------------- USM


def reference_usm(img: np.ndarray, weight=0.5, radius=50, threshold=10) -> np.ndarray:
    """USM with OpenCV's Gaussian blur (HWC float32), written from the published description."""
    size = radius + 1 if radius % 2 == 0 else radius
    blur = cv2.GaussianBlur(img, (size, size), 0)
    residual = img - blur
    mask = (np.abs(residual) * 255 > threshold).astype(np.float32)
    soft = cv2.GaussianBlur(mask, (size, size), 0)
    sharp = np.clip(img + weight * residual, 0, 1)
    return soft * sharp + (1 - soft) * img


def test_usm_matches_opencv_reference():
    img = smooth_images(1, 96, seed=4)
    img[..., 40:60, 30:70] = 0.9  # add hard edges
    ours = usm_sharpen(img)[0].permute(1, 2, 0).numpy()
    ref = reference_usm(np.ascontiguousarray(img[0].permute(1, 2, 0).numpy()))
    assert np.abs(ours - ref).max() < 1e-4


def test_usm_behaviour():
    flat = torch.full((1, 3, 64, 64), 0.4)
    assert torch.allclose(usm_sharpen(flat), flat, atol=1e-6)
    step = torch.full((1, 3, 64, 64), 0.3)
    step[..., 32:] = 0.7
    sharp = usm_sharpen(step)
    assert sharp.shape == step.shape and sharp.min() >= 0 and sharp.max() <= 1
    assert sharp[0, 0, 5, 30] < 0.3 and sharp[0, 0, 5, 33] > 0.7  # overshoot on both sides of the edge
    assert torch.allclose(usm_sharpen(step, weight=0.0), step, atol=1e-6)
    assert torch.equal(usm_sharpen(step, threshold=255), step)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_degradation_on_gpu_matches_cpu_without_noise():
    params = sample_degradation(gen(4)).without_noise()
    images = smooth_images(2, 64)
    cpu = apply_degradation(params, images)
    gpu = apply_degradation(params, images.cuda())
    assert gpu.is_cuda
    assert (gpu.cpu() - cpu).abs().max() <= 2 / 255  # JPEG input may round differently by one level


# ----------------------------------------------------------------------------- kernel draws and edge cases


def test_kernel_size_and_shape_parameters_are_validated_at_their_bounds():
    assert torch.equal(kernels.gaussian_kernel(1, 1.0), torch.ones(1, 1))  # the smallest odd size is valid
    for size in (0, -1, 7.0):
        with pytest.raises(ValueError, match="positive odd int"):
            kernels.gaussian_kernel(size, 1.0)
    for sx, sy in ((0.0, 1.0), (1.0, 0.0)):
        with pytest.raises(ValueError, match="sigma_x and sigma_y must be > 0"):
            kernels.gaussian_kernel(7, sx, sy)
    with pytest.raises(ValueError, match="beta must be > 0"):
        kernels.generalized_gaussian_kernel(7, 1.0, beta=0.0)
    with pytest.raises(ValueError, match="cutoff"):
        kernels.sinc_kernel(7, 0.0)
    assert torch.isfinite(kernels.sinc_kernel(7, math.pi)).all()  # pi itself is allowed


def test_default_shape_parameters_are_gaussian_and_unrotated():
    # beta = 1 turns the generalised Gaussian into the Gaussian; theta defaults to 0 (no rotation)
    assert torch.allclose(kernels.generalized_gaussian_kernel(15, 1.7, 2.2), kernels.gaussian_kernel(15, 1.7, 2.2),
                          atol=1e-7)
    size, sx, sy = 11, 2.5, 1.0
    axis = np.arange(size) - size // 2
    xx, yy = np.meshgrid(axis, axis)
    q = (xx / sx) ** 2 + (yy / sy) ** 2  # beta = 1, theta = 0
    plateau = 1 / (1 + q)
    assert np.allclose(kernels.plateau_kernel(size, sx, sy).numpy(), plateau / plateau.sum(), atol=1e-7)


def test_choice_validates_its_weights():
    with pytest.raises(ValueError, match="^options must not be empty$"):
        kernels.choice(gen(), [])
    for probs in ([1.0], [1.0, -0.5], [0.0, 0.0]):
        with pytest.raises(ValueError, match="non-negative weights with a positive sum"):
            kernels.choice(gen(), ["a", "b"], probs)
    assert {kernels.choice(gen(i), ["a", "b"], [0.0, 2.0]) for i in range(20)} == {"b"}  # a zero weight is allowed


def test_random_beta_is_drawn_below_or_above_one_with_equal_odds():
    g = gen(3)
    betas = np.array([kernels._random_beta(g, (0.5, 4.0)) for _ in range(400)])
    below = betas < 1
    assert 0.42 < below.mean() < 0.58
    assert betas[below].min() >= 0.5 and betas[below].max() < 1 and betas[below].min() < 0.55
    assert betas[~below].max() <= 4.0 and betas[~below].min() < 1.1 and betas[~below].max() > 3.8


def test_sinc_cutoff_range_depends_on_the_kernel_size():
    g = gen(5)
    for size, low in ((11, math.pi / 3), (13, math.pi / 5), (21, math.pi / 5)):
        cutoffs = [kernels.random_sinc_cutoff(g, size) for _ in range(300)]
        assert low <= min(cutoffs) < low + 0.05 and math.pi - 0.05 < max(cutoffs) <= math.pi


@pytest.mark.parametrize("kind", kernels.KERNEL_TYPES)
def test_random_mixed_kernel_follows_the_documented_draw(kind):
    """Each type, drawn with a twin generator in the documented order: type, sigma_x, [sigma_y, theta], [beta]."""
    sigma, betag, betap = (0.2, 3.0), (0.5, 4.0), (1.0, 2.0)
    for seed in range(4):
        kernel, name = kernels.random_mixed_kernel(gen(seed), 15, [kind, "iso"], [1.0, 0.0], sigma, betag, betap)
        assert name == kind
        twin = gen(seed)
        assert kernels.choice(twin, [kind, "iso"], [1.0, 0.0]) == kind
        sx = kernels.uniform(twin, *sigma)
        sy, theta = (kernels.uniform(twin, *sigma), kernels.uniform(twin, -math.pi, math.pi)) if "aniso" in kind \
            else (sx, 0.0)
        if kind in ("iso", "aniso"):
            expected = kernels.gaussian_kernel(15, sx, sy, theta)
        elif kind.startswith("generalized"):
            expected = kernels.generalized_gaussian_kernel(15, sx, sy, theta, kernels._random_beta(twin, betag))
        else:
            expected = kernels.plateau_kernel(15, sx, sy, theta, kernels._random_beta(twin, betap))
        assert torch.equal(kernel, expected)
        isotropic = torch.allclose(kernel, kernel.T, atol=1e-7)
        assert isotropic == ("aniso" not in kind)


def test_random_mixed_kernel_uses_the_type_weights():
    g = gen(9)
    names = [kernels.random_mixed_kernel(g, 7, ["iso", "aniso"], [0.9, 0.1], (0.2, 3), (0.5, 4), (1, 2))[1]
             for _ in range(200)]
    assert 0.82 < names.count("iso") / 200 < 0.97


# ----------------------------------------------------------------------------- the pipeline, step by step


def degrade_by_hand(p: DegradationParams, images: torch.Tensor) -> torch.Tensor:
    """The documented noiseless pipeline, composed from the module's primitives."""
    from metaf2n.degrade import resize

    s = p.scale
    h, w = images.shape[-2:]
    out = images if p.first.kernel is None else filter2d(images, p.first.kernel)
    out = resize(out, (max(1, int(h * p.first.resize_scale)), max(1, int(w * p.first.resize_scale))),
                 p.first.resize_mode).clamp(0, 1)
    out = jpeg_compress(out, p.first.jpeg_quality)
    out = out if p.second.kernel is None else filter2d(out, p.second.kernel)
    out = resize(out, (max(1, int(h / s * p.second.resize_scale)), max(1, int(w / s * p.second.resize_scale))),
                 p.second.resize_mode).clamp(0, 1)

    def resize_and_sinc(x):
        x = resize(x, (h // s, w // s), p.final_resize_mode)
        return x if p.sinc_kernel is None else filter2d(x, p.sinc_kernel)

    if p.jpeg_last:
        out = jpeg_compress(resize_and_sinc(out), p.second.jpeg_quality)
    else:
        out = resize_and_sinc(jpeg_compress(out, p.second.jpeg_quality))
    return (out * 255).round().clamp(0, 255) / 255


def test_noiseless_pipeline_equals_its_steps_composed_by_hand():
    images = smooth_images(2, 72, seed=1)[..., :56]  # 72 x 56: the two sides scale differently
    seen = set()
    for seed in range(40):
        params = sample_degradation(gen(seed)).without_noise()
        case = (params.second.kernel is None, params.sinc_kernel is None, params.jpeg_last)
        if case in seen:
            continue
        seen.add(case)
        assert torch.equal(apply_degradation(params, images), degrade_by_hand(params, images)), case
    assert len(seen) == 8  # with and without second blur and final sinc, both JPEG orders


def grey_images(batch=2, size=64, seed=0):
    """Grey (R = G = B) smooth images: JPEG at quality 100 then only rounds (no chroma to subsample)."""
    return smooth_images(batch, size, seed)[:, :1].expand(batch, 3, size, size).contiguous()


def cv2_filter(images: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Correlation with OpenCV (reflect-101 borders, as torch's reflect padding)."""
    planes = images.reshape(-1, *images.shape[-2:]).double().numpy()
    out = [cv2.filter2D(p, -1, kernel.double().numpy(), borderType=cv2.BORDER_REFLECT_101) for p in planes]
    return torch.from_numpy(np.stack(out)).float().view_as(images)


def area(images, size=16):
    return torch.nn.functional.interpolate(images, size=(size, size), mode="area")


def test_one_step_blur_only():
    images = grey_images()
    k = kernels.gaussian_kernel(9, 2.0, 0.8, 0.3)
    p = identity_params(quality=100)
    p = replace(p, first=replace(p.first, kernel=k))
    lr = apply_degradation(p, images)
    expected = area(cv2_filter(images, k))
    assert (lr - expected).abs().max() < 3 / 255
    assert (area(images) - expected).abs().max() > 10 / 255  # the blur is far larger than the tolerance
    # the second blur acts on the stage-1 output (here resized to half size), before the second resize
    q = identity_params(quality=100)
    q = replace(q, first=replace(q.first, resize_scale=0.5), second=replace(q.second, kernel=k))
    second = apply_degradation(q, images)
    assert (second - area(cv2_filter(area(images, 32), k))).abs().max() < 3 / 255
    assert (second - expected).abs().max() > 10 / 255


def test_one_step_sinc_only_at_quality_100():
    images = grey_images(seed=2)
    sinc = kernels.sinc_kernel(11, math.pi / 3)
    p = replace(identity_params(quality=100), sinc_kernel=sinc)
    after_resize = cv2_filter(area(images), sinc)  # the final sinc filters the LR image
    for jpeg_last in (True, False):
        lr = apply_degradation(replace(p, jpeg_last=jpeg_last), images)
        assert (lr - after_resize).abs().max() < 3 / 255
    assert (area(cv2_filter(images, sinc)) - after_resize).abs().max() > 10 / 255  # the order is visible


@pytest.mark.parametrize("jpeg_last", [True, False])
def test_each_final_jpeg_order(jpeg_last):
    images = smooth_images(2, 64, seed=3)
    sinc = kernels.sinc_kernel(9, math.pi / 4)
    p = replace(identity_params(quality=100), sinc_kernel=sinc, jpeg_last=jpeg_last)
    p = replace(p, second=replace(p.second, jpeg_quality=40))  # the final JPEG uses the stage-2 quality
    stage1 = jpeg_compress(area(images, 64), 100)  # stage 1 at scale 1: a JPEG round trip at quality 100
    lr_in = area(stage1)
    resized_then_jpeg = jpeg_compress(filter2d(lr_in, sinc), 40)
    jpeg_then_resized = filter2d(jpeg_compress(lr_in, 40), sinc)
    expected, other = (resized_then_jpeg, jpeg_then_resized) if jpeg_last else (jpeg_then_resized, resized_then_jpeg)
    to8 = lambda x: (x * 255).round().clamp(0, 255) / 255
    lr = apply_degradation(p, images)
    assert torch.equal(lr, to8(expected))
    assert not torch.equal(lr, to8(other))


def test_stage_qualities_are_each_applied():
    images = smooth_images(2, 64, seed=4) * 0.8 + 0.1 * torch.rand(2, 3, 64, 64, generator=gen())
    clean = apply_degradation(identity_params(quality=100), images)
    for stage in ("first", "second"):
        p = identity_params(quality=100)
        p = replace(p, **{stage: replace(getattr(p, stage), jpeg_quality=10)})
        assert (apply_degradation(p, images) - clean).abs().mean() > 2 / 255, stage


def test_the_noise_seed_of_the_params_drives_the_noise():
    params = sample_degradation(gen(3))
    params = replace(params, first=replace(params.first, noise=NoiseParams("gaussian", 20.0, False)))
    images = smooth_images(2, 64)
    default = apply_degradation(params, images)
    assert torch.equal(default, apply_degradation(params, images, gen(params.noise_seed)))
    assert not torch.equal(default, apply_degradation(replace(params, noise_seed=params.noise_seed + 1), images))
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None"):
        apply_degradation(params, images, 0)


def test_each_stage_adds_its_own_noise():
    images = grey_images()
    clean = apply_degradation(identity_params(quality=100), images)
    for stage in ("first", "second"):
        p = identity_params(quality=100)
        p = replace(p, **{stage: replace(getattr(p, stage), noise=NoiseParams("gaussian", 25.0, False))})
        assert (apply_degradation(p, images) - clean).abs().mean() > 1 / 255, stage


def test_resize_directions_follow_the_official_probabilities():
    draws = [sample_degradation(gen(100 + i)) for i in range(300)]
    for stage, (up, down, keep), (low, high) in (("first", (0.2, 0.7, 0.1), (0.15, 1.5)),
                                                 ("second", (0.3, 0.4, 0.3), (0.3, 1.2))):
        scales = np.array([getattr(p, stage).resize_scale for p in draws])
        assert abs((scales > 1).mean() - up) < 0.08 and abs((scales < 1).mean() - down) < 0.08
        assert abs((scales == 1).mean() - keep) < 0.08
        assert low <= scales.min() < low + 0.1 and high - 0.1 < scales.max() <= high
    modes = [p.final_resize_mode for p in draws]
    assert {m: modes.count(m) > 60 for m in ("area", "bilinear", "bicubic")} == dict.fromkeys(modes, True)


def test_tiny_images_and_size_checks():
    params = identity_params(quality=100)
    with pytest.raises(ValueError, match="at least 4x4"):
        apply_degradation(params, torch.rand(1, 3, 3, 16))
    lr = apply_degradation(replace(params, first=replace(params.first, resize_scale=0.01)), smooth_images(1, 64))
    assert lr.shape == (1, 3, 16, 16)  # sizes never collapse to zero pixels


def test_describe_names_every_choice():
    p = identity_params(quality=90)
    assert p.describe() == ("[1] no blur, x1.00 area, no noise, q90 | [2] no blur, x1.00 area, no noise, q90 | "
                            "no sinc, resize+sinc->jpeg")
    p = replace(p, first=replace(p.first, kernel=kernels.gaussian_kernel(7, 1.0), kernel_type="iso",
                                 noise=NoiseParams("gaussian", 3.5, gray=True)),
                second=replace(p.second, resize_scale=0.5, resize_mode="bicubic", noise=NoiseParams("poisson", 1.25)),
                sinc_kernel=kernels.sinc_kernel(9, 2.0), jpeg_last=False)
    assert p.describe() == ("[1] iso 7px, x1.00 area, grey gaussian 3.50, q90 | "
                            "[2] no blur, x0.50 bicubic, poisson 1.25, q90 | sinc 9px, jpeg->resize+sinc")


def test_config_validation_bounds():
    DegradationConfig(kernel_sizes=(1,), jpeg_range=(1, 1), jpeg_range2=(100, 100))  # the bounds are allowed
    for bad in ({"kernel_sizes": ()}, {"kernel_sizes": (0,)}, {"kernel_sizes": (4,)}, {"kernel_sizes": (7, 8)}):
        with pytest.raises(ValueError, match="kernel_sizes must be positive odd ints"):
            DegradationConfig(**bad)
    for name, bad in (("jpeg_range", (96, 95)), ("jpeg_range2", (30, 101)), ("jpeg_range2", (0, 50))):
        with pytest.raises(ValueError, match=f"{name} must satisfy 1 <= low <= high <= 100"):
            DegradationConfig(**{name: bad})
    for scale in (0, 2.0):
        with pytest.raises(ValueError, match="scale must be a positive int"):
            DegradationConfig(scale=scale)
    with pytest.raises(ValueError, match="resize_modes must be a non-empty subset"):
        DegradationConfig(resize_modes=())
    with pytest.raises(ValueError, match="noise kind"):
        NoiseParams("salt")
    with pytest.raises(ValueError, match="noise level must be >= 0"):
        NoiseParams("gaussian", -1.0)
    with pytest.raises(ValueError, match="jpeg_quality must be in 1..100"):
        replace(identity_params(), first=replace(identity_params().first, jpeg_quality=0))


def test_grey_poisson_noise_follows_the_luma():
    # every 8-bit level present in each channel; luma (0.299 R + 0.587 G + 0.114 B) of R = G = B is the grey level
    levels = (torch.arange(128 * 128) % 256)[torch.randperm(128 * 128, generator=gen(1))]
    image = (levels.float().view(1, 1, 128, 128) / 255).expand(1, 3, 128, 128).contiguous()
    residual = add_noise(image, NoiseParams("poisson", 1.0, gray=True), gen()) - image
    mid = (image[:, 0] > 0.3) & (image[:, 0] < 0.7)
    assert abs(residual[:, 0][mid].var().item() / (image[:, 0][mid].mean().item() / 256) - 1) < 0.15
    # a colour image: the noise is that of its luma, the same on every channel
    colour = torch.stack([image[:, 0], image[:, 0] * 0.5, 1 - image[:, 0]], 1)
    residual = add_noise(colour, NoiseParams("poisson", 1.0, gray=True), gen()) - colour
    luma = 0.299 * colour[:, 0] + 0.587 * colour[:, 1] + 0.114 * colour[:, 2]
    photons = 2 ** math.ceil(math.log2(len(torch.unique((luma * 255).round()))))  # BasicSR: 2^ceil(log2(levels))
    assert photons == 128
    inside = (colour > 0.05).all(1) & (colour < 0.95).all(1)
    assert abs(residual[:, 1][inside].var().item() / (luma[inside].mean().item() / photons) - 1) < 0.15
    unclipped = inside & (colour + residual > 0).all(1) & (colour + residual < 1).all(1)
    assert unclipped.float().mean() > 0.3
    assert torch.allclose(residual[:, 0][unclipped], residual[:, 2][unclipped], atol=1e-6)


def test_no_noise_means_clamping_only():
    x = torch.linspace(-0.5, 1.5, 48).view(1, 3, 4, 4)
    for noise in (NoiseParams(), NoiseParams("none", 5.0), NoiseParams("gaussian", 0.0), NoiseParams("poisson", 0.0)):
        assert torch.equal(add_noise(x, noise, gen()), x.clamp(0, 1)), noise


def test_smallest_images_and_kernel_validation():
    assert apply_degradation(identity_params(), torch.rand(2, 3, 4, 4, generator=gen())).shape == (2, 3, 1, 1)
    p = identity_params()
    lr = apply_degradation(replace(p, first=replace(p.first, resize_scale=0.01)), smooth_images(1, 64))
    assert lr.shape == (1, 3, 16, 16)  # stage 1 shrinks to one pixel (never zero), so the result is flat
    assert torch.equal(lr, lr[..., :1, :1].expand_as(lr))
    image = torch.rand(1, 3, 9, 9, generator=gen())
    for kernel in (torch.ones(4, 4) / 16, torch.ones(3, 5) / 15, torch.ones(5) / 5):
        with pytest.raises(ValueError, match=rf"^kernel must be a square odd-sized 2-D tensor, got shape "
                                             rf"\({', '.join(map(str, kernel.shape))},?\)$"):
            filter2d(image, kernel)
    with pytest.raises(TypeError, match=r"^images must be a torch.Tensor, got list$"):
        apply_degradation(p, [[0.5]])
    with pytest.raises(ValueError, match=r"^images must have shape \(B, 3, H, W\), got \(1, 1, 8, 8\)$"):
        apply_degradation(p, torch.rand(1, 1, 8, 8))
    with pytest.raises(TypeError, match=r"^generator must be a torch.Generator or None, got int$"):
        apply_degradation(p, image, 3)


def test_pad_kernel_centres_the_kernel_in_zeros():
    k = kernels.gaussian_kernel(3, 1.0)
    padded = kernels.pad_kernel(k, 7)
    assert padded.shape == (7, 7) and torch.equal(padded[2:5, 2:5], k) and padded.sum() == k.sum()
    assert torch.equal(kernels.pad_kernel(k, 3), k)
    for size in (1, 6):
        with pytest.raises(ValueError, match=rf"^size must be >= 3 with an even difference, got {size}$"):
            kernels.pad_kernel(k, size)


def test_both_stages_use_their_own_kernel_type_weights():
    draws = [sample_degradation(gen(500 + i)) for i in range(300)]
    for stage in ("first", "second"):
        types = [getattr(p, stage).kernel_type for p in draws if getattr(p, stage).kernel_type in kernels.KERNEL_TYPES]
        assert 0.35 < types.count("iso") / len(types) < 0.56, stage  # weight 0.45 of 1.0 (uniform would be 1/6)


def test_jpeg_clamps_its_input_and_accepts_quality_1():
    images = smooth_images(1, 32, seed=6) * 1.6 - 0.3  # values below 0 and above 1
    assert images.min() < 0 and images.max() > 1
    assert torch.equal(jpeg_compress(images, 80), jpeg_compress(images.clamp(0, 1), 80))
    assert jpeg_compress(images, 1).shape == images.shape
    replace(identity_params(), first=replace(identity_params().first, jpeg_quality=1))  # quality 1 is valid


def test_resize_and_usm_arguments():
    from metaf2n.degrade import resize

    with pytest.raises(ValueError, match=r"^mode must be one of \('area', 'bilinear', 'bicubic'\), got 'nearest'$"):
        resize(torch.rand(1, 3, 8, 8), (4, 4), "nearest")
    with pytest.raises(ValueError, match=r"^radius must be >= 1, got 0$"):
        usm_sharpen(torch.rand(1, 3, 8, 8), radius=0)
    with pytest.raises(ValueError, match=r"^img must have shape \(B, 3, H, W\)"):
        usm_sharpen(torch.rand(1, 1, 8, 8))
    img = smooth_images(1, 48, seed=7)
    img[..., 20:30, 10:40] = 0.95
    for radius in (11, 20):  # an odd radius is the blur size itself; an even one is rounded up to the next odd size
        ours = usm_sharpen(img, radius=radius)[0].permute(1, 2, 0).numpy()
        ref = reference_usm(np.ascontiguousarray(img[0].permute(1, 2, 0).numpy()), radius=radius)
        assert np.abs(ours - ref).max() < 1e-4, radius
