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


SMALL = {"nf": 16, "nb": 2, "gc": 8}


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


# ----------------------------------------------------------------------------- forwards written out independently


def lrelu(t):
    return torch.nn.functional.leaky_relu(t, 0.2)


def conv(state, name, t, stride=1):
    return torch.nn.functional.conv2d(t, state[f"{name}.weight"], state.get(f"{name}.bias"), stride=stride, padding=1)


def rrdbnet_reference(state, x, num_block):
    """ESRGAN's RRDBNet x4 (BasicSR's forward), from the published description, on a state dict."""
    feat = conv(state, "conv_first", x)
    body = feat
    for b in range(num_block):
        block_in = body
        for r in (1, 2, 3):
            features = [body]
            for c in (1, 2, 3, 4):
                features.append(lrelu(conv(state, f"body.{b}.rdb{r}.conv{c}", torch.cat(features, 1))))
            body = body + 0.2 * conv(state, f"body.{b}.rdb{r}.conv5", torch.cat(features, 1))
        body = block_in + 0.2 * body
    feat = feat + conv(state, "conv_body", body)
    up = lambda t: torch.nn.functional.interpolate(t, scale_factor=2, mode="nearest")
    feat = lrelu(conv(state, "conv_up1", up(feat)))
    feat = lrelu(conv(state, "conv_up2", up(feat)))
    return conv(state, "conv_last", lrelu(conv(state, "conv_hr", feat)))


def test_rrdbnet_forward_matches_an_independent_forward(tmp_path):
    shapes = rrdbnet_published_shapes(nf=8, nb=2, gc=4)
    state = {k: 0.2 * v for k, v in random_state(shapes, seed=5).items()}  # random biases too
    path = tmp_path / "small.pth"
    torch.save({"params": state}, path)
    model = load_pretrained(RRDBNet(num_feat=8, num_block=2, num_grow_ch=4), path)
    x = torch.rand(2, 3, 6, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(x), rrdbnet_reference(state, x, 2), rtol=1e-5, atol=1e-5)
    zero_blocks = RRDBNet(num_in_ch=1, num_out_ch=2, num_feat=4, num_block=0, num_grow_ch=2)  # 0 blocks allowed
    assert zero_blocks(x[:, :1]).shape == (2, 2, 24, 20)


def test_dense_blocks_start_near_identity():
    torch.manual_seed(0)
    model = RRDBNet(num_feat=32, num_block=1, num_grow_ch=16)
    for c in (1, 2, 3, 4, 5):
        layer = getattr(model.body[0].rdb1, f"conv{c}")
        fan_in = layer.weight[0].numel()
        # ESRGAN's init: Kaiming normal (std sqrt(2 / fan_in)) scaled by 0.1, zero bias
        assert abs(layer.weight.std().item() / (0.1 * (2 / fan_in) ** 0.5) - 1) < 0.15
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
    for bad in ({"num_in_ch": 0}, {"num_out_ch": 0}, {"num_block": -1}, {"num_grow_ch": 0}, {"num_feat": 8.0}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be an int >= "):
            RRDBNet(**bad)


def spectral_weight(state, name):
    """Eval-mode spectral normalisation: W / (u^T W v) with the stored u and v."""
    w = state[f"{name}.weight_orig"]
    return w / torch.dot(state[f"{name}.weight_u"], w.flatten(1) @ state[f"{name}.weight_v"])


def discriminator_reference(state, x, skip):
    """Real-ESRGAN's UNetDiscriminatorSN forward, written from the published code, on a state dict."""
    sd = dict(state)
    for i in range(1, 9):
        sd[f"conv{i}.weight"] = spectral_weight(state, f"conv{i}")
    up = lambda t: torch.nn.functional.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False)
    x0 = lrelu(conv(sd, "conv0", x))
    x1 = lrelu(conv(sd, "conv1", x0, stride=2))
    x2 = lrelu(conv(sd, "conv2", x1, stride=2))
    x3 = lrelu(conv(sd, "conv3", x2, stride=2))
    x4 = lrelu(conv(sd, "conv4", up(x3))) + (x2 if skip else 0)
    x5 = lrelu(conv(sd, "conv5", up(x4))) + (x1 if skip else 0)
    x6 = lrelu(conv(sd, "conv6", up(x5))) + (x0 if skip else 0)
    out = lrelu(conv(sd, "conv8", lrelu(conv(sd, "conv7", x6))))
    return conv(sd, "conv9", out)


@pytest.mark.parametrize("skip", [True, False])
def test_discriminator_forward_matches_an_independent_forward(tmp_path, skip):
    state = random_state(discriminator_published_shapes(nf=4), seed=7)
    for i in range(1, 9):  # stored power-iteration vectors are unit vectors
        for vec in ("u", "v"):
            key = f"conv{i}.weight_{vec}"
            state[key] = state[key] / state[key].norm()
    path = tmp_path / "netD.pth"
    torch.save({"params": state}, path)
    model = load_pretrained(UNetDiscriminatorSN(num_feat=4, skip_connection=skip), path).eval()
    x = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(x)
        assert torch.allclose(out, discriminator_reference(state, x, skip), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(out, discriminator_reference(state, x, not skip), rtol=1e-3, atol=1e-3)


def test_discriminator_skip_connection_changes_the_output():
    torch.manual_seed(0)
    with_skip = UNetDiscriminatorSN(num_feat=4).eval()
    without = UNetDiscriminatorSN(num_feat=4, skip_connection=False).eval()
    without.load_state_dict(with_skip.state_dict())
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert (with_skip(x) - without(x)).abs().max() > 1e-3
    for bad in ({"num_in_ch": 0}, {"num_feat": 0}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be a positive int"):
            UNetDiscriminatorSN(**bad)
    with pytest.raises(ValueError, match="divisible by 8"):
        with_skip(torch.rand(1, 3, 16, 12))


def masknet_reference(state, lr_up, pseudo, output):
    x = torch.cat([lr_up, pseudo], 1)
    for i in range(1, 8):
        x = torch.relu(conv(state, f"conv{i}", x))
    logits = conv(state, "conv8", x)
    return torch.relu(logits) if output == "relu" else torch.sigmoid(logits)


@pytest.mark.parametrize("output", ["relu", "sigmoid"])
def test_masknet_forward_matches_an_independent_forward(output):
    torch.manual_seed(3)
    model = MaskNet(num_feat=4, output=output)
    state = {k: v + 0.3 * torch.randn_like(v) for k, v in model.state_dict().items()}  # some logits < 0
    model.load_state_dict(state)
    lr_up, pseudo = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        out = model(lr_up, pseudo)
        assert torch.allclose(out, masknet_reference(state, lr_up, pseudo, output), atol=1e-6)
    if output == "relu":
        assert (out == 0).any() and (out > 0).any()


def test_masknet_starts_at_unit_weights():
    torch.manual_seed(0)
    model = MaskNet(num_feat=8)
    assert torch.equal(model.conv8.bias, torch.ones(1))
    assert 0 < model.conv8.weight.abs().max() < 0.05  # scaled down by 0.01
    assert all(torch.equal(getattr(model, f"conv{i}").bias, torch.zeros(8)) for i in range(1, 8))
    with pytest.raises(ValueError, match="num_feat must be a positive int"):
        MaskNet(num_feat=0)
    with pytest.raises(ValueError, match="lr_up and pseudo_hq"):
        model(torch.rand(1, 3, 8, 8)[:, :2], torch.rand(1, 3, 8, 8)[:, :2])


# ----------------------------------------------------------------------------- checkpoint rules


def test_only_a_leading_module_prefix_is_stripped():
    from metaf2n.models import extract_state_dict

    t = torch.zeros(1)
    state = extract_state_dict({"module.decoder.x": t, "body.module.x": t, "module.module.y": t, "modules.z": t})
    assert sorted(state) == ["body.module.x", "decoder.x", "module.y", "modules.z"]
    with pytest.raises(ValueError, match="checkpoint must be a dict, got list"):
        extract_state_dict([t])
    with pytest.raises(ValueError, match=r"^checkpoint holds no state dict \(expected 'params_ema', 'params'"):
        extract_state_dict({"params": {"a": t, "b": 3}})


def test_a_checkpoint_carrying_a_pickled_callable_is_refused(tmp_path):
    import os

    state = random_state(rrdbnet_published_shapes(**SMALL))
    path = tmp_path / "evil.pth"
    torch.save({"params": state, "hook": os.getcwd}, path)
    with pytest.raises(ValueError, match=r"evil.pth' is refused: an unsafe pickle \(it would run posix.getcwd\)$"):
        load_pretrained(RRDBNet(num_feat=16, num_block=2, num_grow_ch=8), path)
    with pytest.raises(TypeError, match="^model must be a torch.nn.Module, got dict$"):
        load_pretrained({}, path)


def test_long_key_lists_are_shortened(tmp_path):
    state = random_state(rrdbnet_published_shapes(**SMALL))
    path = tmp_path / "partial.pth"
    torch.save({"params": {k: v for k, v in state.items() if not k.startswith("body.")}}, path)
    missing = sorted(k for k in state if k.startswith("body."))
    with pytest.raises(ValueError) as info:
        load_pretrained(RRDBNet(num_feat=16, num_block=2, num_grow_ch=8), path)
    message = str(info.value)
    assert f"missing keys ({len(missing)}): " + ", ".join(missing[:20]) + f", ... ({len(missing) - 20} more)" in message
    assert "unexpected" not in message and "shape" not in message and str(path) in message


def test_smallest_discriminator_and_key_list_lengths(tmp_path):
    assert UNetDiscriminatorSN(num_in_ch=1, num_feat=1)(torch.rand(1, 1, 8, 8)).shape == (1, 1, 8, 8)
    from metaf2n.models.checkpoint import _format_keys

    keys = [f"k{i:02d}" for i in range(21)]
    assert _format_keys(keys[:20]) == ", ".join(keys[:20])  # 20 keys: all listed
    assert _format_keys(keys) == ", ".join(keys[:20]) + ", ... (1 more)"


def test_loading_is_logged_and_default_block_sizes_are_esrgans(tmp_path, caplog):
    import logging

    from metaf2n.models.rrdbnet import RRDB, ResidualDenseBlock

    state = random_state(rrdbnet_published_shapes(**SMALL))
    path = tmp_path / "ok.pth"
    torch.save(state, path)
    with caplog.at_level(logging.INFO, logger="metaf2n.models.checkpoint"):
        load_pretrained(RRDBNet(num_feat=16, num_block=2, num_grow_ch=8), path)
    assert [r.getMessage() for r in caplog.records] == [f"loaded {len(state)} tensors into RRDBNet from {path}"]
    for block in (RRDB().rdb1, ResidualDenseBlock()):  # 64 features, growth 32
        assert tuple(block.conv1.weight.shape) == (32, 64, 3, 3) and tuple(block.conv5.weight.shape) == (64, 192, 3, 3)
    smallest = RRDBNet(num_in_ch=1, num_out_ch=1, num_feat=1, num_block=0, num_grow_ch=1)
    assert smallest(torch.rand(1, 1, 2, 2)).shape == (1, 1, 8, 8)
