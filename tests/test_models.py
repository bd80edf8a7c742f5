"""Models: published parameter names and shapes, strict checkpoint loading, output shapes."""

import pytest
import torch

from metaf2n.models import MaskNet, RRDBNet, UNetDiscriminatorSN, load_pretrained

# RealESRGAN_x4plus.pth: 16,697,987 parameters in 702 tensors (ESRGAN x4, 23 RRDBs).
REAL_ESRGAN_X4PLUS_PARAMETERS = 16_697_987


def rrdbnet_published_shapes(in_ch=3, out_ch=3, nf=64, nb=23, gc=32):
    """Key -> shape of BasicSR's RRDBNet x4 state dict, written out from the published architecture."""
    shapes = {"conv_first.weight": (nf, in_ch, 3, 3), "conv_first.bias": (nf,)}
    for block in range(nb):
        for rdb in (1, 2, 3):
            for conv in (1, 2, 3, 4, 5):
                out = nf if conv == 5 else gc
                prefix = f"body.{block}.rdb{rdb}.conv{conv}"
                shapes[f"{prefix}.weight"] = (out, nf + (conv - 1) * gc, 3, 3)
                shapes[f"{prefix}.bias"] = (out,)
    for name in ("conv_body", "conv_up1", "conv_up2", "conv_hr"):
        shapes[f"{name}.weight"] = (nf, nf, 3, 3)
        shapes[f"{name}.bias"] = (nf,)
    shapes["conv_last.weight"] = (out_ch, nf, 3, 3)
    shapes["conv_last.bias"] = (out_ch,)
    return shapes


def discriminator_published_shapes(in_ch=3, nf=64):
    """Key -> shape of Real-ESRGAN's UNetDiscriminatorSN state dict (spectral norm on conv1..conv8)."""
    shapes = {"conv0.weight": (nf, in_ch, 3, 3), "conv0.bias": (nf,)}
    sn_convs = {
        "conv1": (nf * 2, nf, 4),
        "conv2": (nf * 4, nf * 2, 4),
        "conv3": (nf * 8, nf * 4, 4),
        "conv4": (nf * 4, nf * 8, 3),
        "conv5": (nf * 2, nf * 4, 3),
        "conv6": (nf, nf * 2, 3),
        "conv7": (nf, nf, 3),
        "conv8": (nf, nf, 3),
    }
    for name, (out, inp, k) in sn_convs.items():
        shapes[f"{name}.weight_orig"] = (out, inp, k, k)
        shapes[f"{name}.weight_u"] = (out,)
        shapes[f"{name}.weight_v"] = (inp * k * k,)
    shapes["conv9.weight"] = (1, nf, 3, 3)
    shapes["conv9.bias"] = (1,)
    return shapes


def random_state(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) for k, shape in shapes.items()}


def assert_state_equal(model, state):
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def test_rrdbnet_full_size_matches_published_names_and_shapes():
    model = RRDBNet()
    expected = rrdbnet_published_shapes()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    assert len(expected) == 702
    assert sum(v.numel() for v in model.parameters()) == REAL_ESRGAN_X4PLUS_PARAMETERS


def test_real_esrgan_x4plus_layout_loads_strictly(tmp_path):
    ema = random_state(rrdbnet_published_shapes(), seed=1)
    path = tmp_path / "RealESRGAN_x4plus.pth"
    torch.save({"params_ema": ema}, path)
    model = load_pretrained(RRDBNet(), path)
    assert_state_equal(model, ema)


SMALL = dict(nf=16, nb=2, gc=8)


@pytest.mark.parametrize("layout", ["params_ema", "params", "bare", "module_prefix", "module_prefix_in_params"])
def test_checkpoint_layouts_load_strictly(tmp_path, layout):
    state = random_state(rrdbnet_published_shapes(**SMALL))
    prefixed = {f"module.{k}": v for k, v in state.items()}
    checkpoint = {
        "params_ema": {"params_ema": state},
        "params": {"params": state, "iter": torch.tensor(5)},
        "bare": state,
        "module_prefix": prefixed,
        "module_prefix_in_params": {"params": prefixed},
    }[layout]
    path = tmp_path / "ckpt.pth"
    torch.save(checkpoint, path)
    model = load_pretrained(RRDBNet(num_feat=16, num_block=2, num_grow_ch=8), path)
    assert_state_equal(model, state)


def test_mismatched_keys_raise_clear_value_error(tmp_path):
    state = random_state(rrdbnet_published_shapes(**SMALL))
    state["conv_extra.weight"] = state.pop("conv_hr.weight")
    path = tmp_path / "bad.pth"
    torch.save({"params": state}, path)
    with pytest.raises(ValueError) as info:
        load_pretrained(RRDBNet(num_feat=16, num_block=2, num_grow_ch=8), path)
    message = str(info.value)
    assert "missing keys (1): conv_hr.weight" in message
    assert "unexpected keys (1): conv_extra.weight" in message


def test_shape_mismatch_raises_value_error(tmp_path):
    state = random_state(rrdbnet_published_shapes(**SMALL))
    state["conv_last.bias"] = torch.zeros(4)
    path = tmp_path / "bad_shape.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"shape mismatches \(1\): conv_last.bias: checkpoint \(4,\) vs model \(3,\)"):
        load_pretrained(RRDBNet(num_feat=16, num_block=2, num_grow_ch=8), path)


def test_params_ema_is_preferred_and_key_selects(tmp_path):
    ema = random_state(rrdbnet_published_shapes(**SMALL), seed=1)
    plain = random_state(rrdbnet_published_shapes(**SMALL), seed=2)
    path = tmp_path / "both.pth"
    torch.save({"params": plain, "params_ema": ema}, path)
    assert_state_equal(load_pretrained(RRDBNet(num_feat=16, num_block=2, num_grow_ch=8), path), ema)
    assert_state_equal(load_pretrained(RRDBNet(num_feat=16, num_block=2, num_grow_ch=8), path, key="params"), plain)


def test_bad_checkpoint_contents_raise_value_error(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"params": random_state(rrdbnet_published_shapes(**SMALL))}, path)
    with pytest.raises(ValueError, match="key 'params_ema' not in checkpoint"):
        load_pretrained(RRDBNet(num_feat=16, num_block=2, num_grow_ch=8), path, key="params_ema")
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, path)
    with pytest.raises(ValueError, match="holds no state dict"):
        load_pretrained(RRDBNet(num_feat=16, num_block=2, num_grow_ch=8), path)


def test_rrdbnet_small_variant_upscales_by_four():
    model = RRDBNet(num_feat=16, num_block=2, num_grow_ch=8)
    out = model(torch.rand(2, 3, 8, 12))
    assert out.shape == (2, 3, 32, 48)


def test_rrdbnet_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_feat"):
        RRDBNet(num_feat=0)


def test_discriminator_full_size_matches_published_names_and_shapes():
    model = UNetDiscriminatorSN()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == discriminator_published_shapes()


def test_discriminator_loads_netD_layout_and_uses_loaded_spectral_state(tmp_path):
    shapes = discriminator_published_shapes(nf=8)
    state = random_state(shapes, seed=3)
    path = tmp_path / "RealESRGAN_x4plus_netD.pth"
    torch.save({"params": state}, path)
    model = load_pretrained(UNetDiscriminatorSN(num_feat=8), path).eval()
    assert_state_equal(model, state)
    logits = model(torch.rand(2, 3, 32, 24))
    assert logits.shape == (2, 1, 32, 24)
    # In eval mode spectral norm divides by u^T W v with the loaded (normalised) u and v.
    w = state["conv1.weight_orig"]
    u = state["conv1.weight_u"]
    v = state["conv1.weight_v"]
    sigma = torch.dot(u, w.flatten(1) @ v)
    assert torch.allclose(model.conv1.weight, w / sigma, rtol=1e-5, atol=1e-6)


def test_discriminator_without_skip_and_size_check():
    model = UNetDiscriminatorSN(num_feat=8, skip_connection=False)
    assert model(torch.rand(1, 3, 16, 16)).shape == (1, 1, 16, 16)
    with pytest.raises(ValueError, match="divisible by 8"):
        model(torch.rand(1, 3, 20, 16))


def test_masknet_architecture_and_outputs(tmp_path):
    torch.manual_seed(0)  # module initialisation draws from the global generator
    model = MaskNet()
    convs = [getattr(model, f"conv{i}") for i in range(1, 9)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(6, 64)] + [(64, 64)] * 6 + [(64, 1)]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    lr_up, pseudo = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    weights = model(lr_up, pseudo)
    assert weights.shape == (2, 1, 16, 16)
    assert weights.min() >= 0
    assert (weights - 1).abs().max() < 0.5  # starts near uniform weighting, not a dead ReLU
    sig = MaskNet(num_feat=8, output="sigmoid")(lr_up, pseudo)
    assert ((sig > 0) & (sig < 1)).all()
    # the two inputs are not interchangeable: channels 0-2 are the LR face, 3-5 the pseudo label
    assert not torch.allclose(model(lr_up, pseudo), model(pseudo, lr_up))

    path = tmp_path / "masknet.pth"
    torch.save({"params": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    copy = load_pretrained(MaskNet(), path)
    assert torch.equal(copy(lr_up, pseudo), weights)


def test_masknet_rejects_bad_arguments():
    with pytest.raises(ValueError, match="output must be one of"):
        MaskNet(output="tanh")
    with pytest.raises(ValueError, match="lr_up and pseudo_hq"):
        MaskNet(num_feat=4)(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 16, 16))
