"""The meta-step (metaf2n.maml): each loss term against a direct computation, the inner update against plain
autograd, MaskNet's path through the inner step, first- vs second-order gradients against finite differences."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from metaf2n.data import TaskConfig, TaskSampler
from metaf2n.maml import MetaConfig, adapt, face_weights, inner_loss, meta_forward, meta_losses
from metaf2n.models import MaskNet, RRDBNet, UNetDiscriminatorSN
from metaf2n.ssl import edge_mask, ssl_loss

TINY_TASKS = TaskConfig(face_patches=2, background_patches=2, face_patch_size=32, face_size=64,
                        background_patch_size=32, background_crop_size=64)


@pytest.fixture(scope="module")
def batch():
    sampler = TaskSampler(config=TINY_TASKS)
    batch = sampler.sample(2, torch.Generator().manual_seed(3))
    assert edge_mask(batch.bg_hr[0]).any() and edge_mask(batch.bg_hr[1]).any()
    return batch


def tiny_models(seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    sr = RRDBNet(num_feat=8, num_block=1, num_grow_ch=8).to(dtype)
    masknet = MaskNet(num_feat=8).to(dtype)
    disc = UNetDiscriminatorSN(num_feat=8).to(dtype)
    return sr, masknet, disc


def grads_of(loss, module):
    return torch.autograd.grad(loss, list(module.parameters()), retain_graph=True, allow_unused=True)


def test_every_term_is_a_finite_scalar_and_total_is_their_weighted_sum(batch, lpips_model):
    sr, masknet, disc = tiny_models()
    config = MetaConfig(w_l1=1.0, w_lpips=0.5, w_gan=0.1, w_reg=0.002, w_ssl=1.0)
    out = meta_forward(sr, masknet, disc, lpips_model, batch, config)
    losses = out.losses
    assert set(losses) == {"total", "l1", "lpips", "gan", "reg", "ssl", "inner"}
    for key, value in losses.items():
        assert value.shape == () and torch.isfinite(value), key
    for key in ("l1", "lpips", "gan", "ssl", "inner"):
        assert losses[key] > 0, key
    expected = losses["l1"] + 0.5 * losses["lpips"] + 0.1 * losses["gan"] + 0.002 * losses["reg"] + losses["ssl"]
    torch.testing.assert_close(losses["total"], expected)
    assert out.sr_backgrounds.shape == batch.bg_hr.shape
    assert out.face_weights.shape == (2, 2, 1, 32, 32)


@pytest.mark.parametrize("ssl_target", ["hr", "usm"])
def test_terms_match_a_direct_computation_without_adaptation(batch, lpips_model, ssl_target):
    # inner_lr = 0 keeps the fast weights equal to theta, so every term can be written down with the plain module.
    sr, masknet, disc = tiny_models()
    disc.eval()  # no spectral-norm power iteration: both computations see the same discriminator
    config = MetaConfig(inner_lr=0.0, ssl_target=ssl_target)
    losses = meta_losses(sr, masknet, disc, lpips_model, batch, config)
    per_task = {k: [] for k in ("l1", "lpips", "gan", "reg", "ssl", "inner")}
    for t in range(2):
        up = F.interpolate(batch.face_lr[t], scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)
        w = masknet(up, batch.face_pseudo[t])
        out = sr(batch.bg_lr[t])
        per_task["inner"].append((w * (sr(batch.face_lr[t]) - batch.face_pseudo[t]).abs()).mean())
        per_task["l1"].append((out - batch.bg_hr_usm[t]).abs().mean())
        per_task["lpips"].append(lpips_model(out, batch.bg_hr_usm[t]).mean())
        per_task["gan"].append(F.binary_cross_entropy_with_logits(disc(out), torch.ones(2, 1, 32, 32)))
        per_task["reg"].append(((w - 1) ** 2).mean() / 2)
        target, edges = (batch.bg_hr, batch.bg_edges) if ssl_target == "hr" else (batch.bg_hr_usm, batch.bg_edges_usm)
        per_task["ssl"].append(ssl_loss(out, target[t], edges[t]))
    for key, values in per_task.items():
        torch.testing.assert_close(losses[key], torch.stack(values).mean(), rtol=2e-5, atol=1e-6, msg=key)


def test_ssl_uses_the_batch_masks_cut_from_whole_crops(batch):
    sr, masknet, _ = tiny_models()
    config = MetaConfig(inner_lr=0.0, w_lpips=0.0, w_gan=0.0)
    with_masks = meta_losses(sr, masknet, None, None, batch, config)["ssl"]
    without = dataclasses.replace(batch, bg_edges=None, bg_edges_usm=None)  # masks computed on the patches
    on_patches = meta_losses(sr, masknet, None, None, without, config)["ssl"]
    recomputed = [edge_mask(batch.bg_hr[t]) for t in range(2)]
    assert any(not torch.equal(recomputed[t], batch.bg_edges[t]) for t in range(2))  # border pixels differ
    assert not torch.isclose(with_masks, on_patches)


def test_ssl_target_changes_the_ssl_term(batch):
    sr, masknet, _ = tiny_models()
    kw = dict(w_lpips=0.0, w_gan=0.0)
    hr = meta_losses(sr, masknet, None, None, batch, MetaConfig(ssl_target="hr", **kw))["ssl"]
    usm = meta_losses(sr, masknet, None, None, batch, MetaConfig(ssl_target="usm", **kw))["ssl"]
    assert not torch.isclose(hr, usm)


def test_l2_norm_regulariser_is_the_norm_over_a_tasks_weights(batch):
    sr, masknet, _ = tiny_models()
    with torch.no_grad():
        masknet.conv8.bias.fill_(1.5)  # W = 1.5 + small: far enough from 1 that the two forms differ
    losses = meta_losses(sr, masknet, None, None, batch, MetaConfig(w_lpips=0, w_gan=0, w_ssl=0, reg_form="l2_norm"))
    expected = []
    for t in range(2):
        w = face_weights(masknet, batch.face_lr[t], batch.face_pseudo[t])
        expected.append(torch.sqrt(((w - 1) ** 2).sum()))
    torch.testing.assert_close(losses["reg"], torch.stack(expected).mean())


def test_one_inner_step_is_sgd_on_the_weighted_face_l1(batch):
    sr, masknet, _ = tiny_models()
    w = face_weights(masknet, batch.face_lr[0], batch.face_pseudo[0]).detach()
    fast, before = adapt(sr, w, batch.face_lr[0], batch.face_pseudo[0], inner_lr=0.05, steps=1, create_graph=False)
    sr.zero_grad()
    loss = (w * (sr(batch.face_lr[0]) - batch.face_pseudo[0]).abs()).mean()
    loss.backward()
    torch.testing.assert_close(before, loss.detach())
    for name, p in sr.named_parameters():
        torch.testing.assert_close(fast[name], p.detach() - 0.05 * p.grad, msg=name)
    # the module itself is untouched
    assert all(p.grad is not None for p in sr.parameters())


def test_two_inner_steps_take_the_second_gradient_at_the_first_fast_weights(batch):
    sr, masknet, _ = tiny_models()
    w = face_weights(masknet, batch.face_lr[0], batch.face_pseudo[0]).detach()
    lr, pseudo = batch.face_lr[0], batch.face_pseudo[0]
    two, _ = adapt(sr, w, lr, pseudo, inner_lr=0.05, steps=2, create_graph=False)
    one, _ = adapt(sr, w, lr, pseudo, inner_lr=0.05, steps=1, create_graph=False)
    one = {k: v.detach().requires_grad_() for k, v in one.items()}
    g = torch.autograd.grad(inner_loss(sr, one, lr, pseudo, w), list(one.values()))
    for (name, p), gk in zip(one.items(), g):
        torch.testing.assert_close(two[name], p - 0.05 * gk, msg=name)


@pytest.mark.parametrize("mode", ["first", "second"])
def test_masknet_learns_through_the_inner_step_without_its_regulariser(batch, mode):
    sr, masknet, _ = tiny_models()
    config = MetaConfig(mode=mode, w_reg=0.0, w_lpips=0.0, w_gan=0.0, w_ssl=0.0)
    total = meta_losses(sr, masknet, None, None, batch, config)["total"]
    grads = grads_of(total, masknet)
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_ssl_adds_a_gradient_to_the_sr_network(batch):
    sr, masknet, _ = tiny_models()
    losses = meta_losses(sr, masknet, None, None, batch, MetaConfig(w_lpips=0.0, w_gan=0.0))
    grads = grads_of(losses["ssl"], sr)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    without = meta_losses(sr, masknet, None, None, batch, MetaConfig(w_lpips=0.0, w_gan=0.0, w_ssl=0.0))
    g_with = torch.cat([g.flatten() for g in grads_of(losses["total"], sr)])
    g_without = torch.cat([g.flatten() for g in grads_of(without["total"], sr)])
    assert (g_with - g_without).abs().max() > 1e-6


def test_missing_modules_for_weighted_terms_are_errors(batch):
    sr, masknet, _ = tiny_models()
    with pytest.raises(ValueError, match="disc"):
        meta_losses(sr, masknet, None, None, batch, MetaConfig(w_lpips=0.0))
    with pytest.raises(ValueError, match="perceptual"):
        meta_losses(sr, masknet, None, None, batch, MetaConfig(w_gan=0.0))


@pytest.mark.parametrize("field,value", [("mode", "third"), ("reg_form", "l1"), ("ssl_target", "lr"),
                                         ("inner_steps", 0), ("w_ssl", -1.0), ("h", 0.0), ("inner_lr", math.nan)])
def test_bad_config_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        MetaConfig(**{field: value})


def test_repeated_meta_steps_on_one_task_lower_its_outer_loss(batch, lpips_model):
    sr, masknet, _ = tiny_models()
    one_task = batch.select(0, 1)
    config = MetaConfig(w_gan=0.0)
    optimizer = torch.optim.Adam([*sr.parameters(), *masknet.parameters()], lr=2e-3)
    history = []
    for _ in range(12):
        total = meta_losses(sr, masknet, None, lpips_model, one_task, config)["total"]
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append(total.item())
    final = meta_losses(sr, masknet, None, lpips_model, one_task, config)["total"].item()
    assert final < 0.8 * history[0], history


# --- first vs second order against finite differences (float64, tiny model) ----------------------------------------
def _float64_setup(batch):
    torch.manual_seed(1)
    sr = RRDBNet(num_feat=4, num_block=0, num_grow_ch=4).double()
    masknet = MaskNet(num_feat=4).double()
    with torch.no_grad():
        masknet.conv8.weight.mul_(20)  # make W depend visibly on the faces
        # zero-initialised biases put whole ReLU maps exactly at their kink, where finite differences see half a
        # slope: move them off it
        for module in (sr, masknet):
            for name, p in module.named_parameters():
                if name.endswith("bias") and name != "conv8.bias":
                    p.add_(0.05 * torch.rand(p.shape, dtype=p.dtype))
    small = batch.select(0, 1)
    small = type(small)(**{f: getattr(small, f)[:, :1].double() for f in
                           ("face_lr", "face_pseudo", "face_gt", "bg_lr", "bg_hr_usm", "bg_hr")},
                        degradations=small.degradations)
    config = MetaConfig(inner_lr=0.5, w_lpips=0.0, w_gan=0.0, w_reg=0.0, l1_weight=0.0)
    return sr, masknet, small, config


def _directional(sr, masknet, small, config, module, direction, eps=1e-6):
    params = list(module.parameters())
    originals = [p.detach().clone() for p in params]

    def total_at(scale):
        with torch.no_grad():
            for p, p0, d in zip(params, originals, direction):
                p.copy_(p0 + scale * d)
        return meta_losses(sr, masknet, None, None, small, config)["total"].item()

    value = (total_at(eps) - total_at(-eps)) / (2 * eps)
    total_at(0.0)
    return value


def test_second_order_matches_finite_differences_and_first_order_drops_only_the_theta_hessian(batch):
    sr, masknet, small, config = _float64_setup(batch)
    gen = torch.Generator().manual_seed(0)
    dir_sr = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in sr.parameters()]
    dir_mask = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in masknet.parameters()]
    fd_sr = _directional(sr, masknet, small, config, sr, dir_sr)
    fd_mask = _directional(sr, masknet, small, config, masknet, dir_mask)

    def analytic(mode):
        cfg = MetaConfig(**{**config.to_dict(), "mode": mode})
        total = meta_losses(sr, masknet, None, None, small, cfg)["total"]
        g_sr = torch.autograd.grad(total, list(sr.parameters()), retain_graph=True)
        g_mask = torch.autograd.grad(total, list(masknet.parameters()))
        dot = lambda gs, ds: float(sum((g * d).sum() for g, d in zip(gs, ds)))  # noqa: E731
        return dot(g_sr, dir_sr), dot(g_mask, dir_mask)

    second_sr, second_mask = analytic("second")
    first_sr, first_mask = analytic("first")
    assert second_sr == pytest.approx(fd_sr, rel=1e-5)
    assert second_mask == pytest.approx(fd_mask, rel=1e-5)
    # first order keeps MaskNet's exact path (theta' depends on W only through the gradient) ...
    assert first_mask == pytest.approx(fd_mask, rel=1e-5)
    # ... and drops the Hessian in theta, which is not negligible here
    assert abs(first_sr - fd_sr) > 1e-3 * abs(fd_sr)
