"""The two CPU paths of the SSL ops, "direct" (a patch loop per row) and "dense" (box filters over bands of lines),
against the plain-PyTorch oracle and each other, and the "auto" choice between them."""

from __future__ import annotations

import pytest
import torch
from conftest import photo
from test_ssl import random_positions, smooth_random

from metaf2n import ops, reference
from metaf2n.ssl import SelfSimilarityLoss, edge_mask, self_similarity_graph, ssl_loss

PATHS = ("direct", "dense")

SETTINGS = [
    {"search": 25, "patch": 9, "padding": "image"},
    {"search": 25, "patch": 9, "padding": "window"},
    {"search": 3, "patch": 1, "padding": "image"},
    {"search": 3, "patch": 1, "padding": "window"},
    {"search": 7, "patch": 3, "padding": "image"},
    {"search": 11, "patch": 5, "padding": "window"},
    {"search": 5, "patch": 9, "padding": "window"},  # patch > search: query pixels outside the window read 0
    {"search": 3, "patch": 7, "padding": "window"},
]


def setting_id(s):
    return f"{s['search']}-{s['patch']}-{s['padding']}"


@pytest.mark.parametrize("setting", [
    pytest.param(s, marks=pytest.mark.slow) if s["search"] == 25 else s for s in SETTINGS
], ids=setting_id)
def test_each_path_matches_the_oracle_on_photos(photo_pair, setting):
    """float32 kernels against the float64 oracle (a float32 oracle's own rounding depends on which ATen kernels the
    CPU dispatches to). Bounds: a distance sums C * patch^2 <= 243 squares, so its float32 error is about
    243 * 6e-8 = 1.5e-5 of d2 at worst (typically sqrt(243) * 6e-8 ~ 1e-6), and d2 / h <= ~25 at h = 0.004 turns that
    into a relative error of ~2.5e-5 in a row's largest terms; the gradient adds one more sum over the window's
    offsets. Both paths reach rows within 3e-7 and gradients within 2e-6 of its maximum, except where S_SR and S_HR
    agree to float32 rounding: there the L1 term's sign(S_SR - S_HR) can come out the other way, which moves one
    pixel's gradient by 5.4e-6 of the maximum in the 5-9-window setting, in every float32 computation alike (both
    paths, and the float32 oracle with ATen's default or vectorised kernels). The gradient tolerance, 2e-5, sits 4x
    above that and far below what a dropped term or a wrong sign gives (> 1e-2)."""
    sr, hr = photo_pair
    mask = edge_mask(hr)
    assert mask[0].sum() != mask[1].sum()  # uneven masks across the batch
    positions = torch.nonzero(mask)
    expected_rows = reference.similarity_graph(hr.double(), positions, **setting)
    oracle = sr.double().requires_grad_()
    expected = reference.ssl_loss(oracle, hr.double(), positions, **setting)
    expected.backward()
    scale = oracle.grad.abs().max()
    assert scale > 0
    for path in PATHS:
        rows = self_similarity_graph(hr, mask, **setting, path=path)
        torch.testing.assert_close(rows.double(), expected_rows, atol=2e-6, rtol=1e-4)
        ours = sr.clone().requires_grad_()
        loss = ssl_loss(ours, hr, mask, **setting, path=path)
        loss.backward()
        torch.testing.assert_close(loss.double(), expected, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(ours.grad.double() / scale, oracle.grad / scale, atol=2e-5, rtol=0)


def both_paths(fn):
    return [fn(path) for path in PATHS]


def assert_paths_agree_in_float64(x, y, positions, setting, h=0.05):
    """Rows, the graph op's gradient, the loss and both loss gradients agree to rounding between the paths."""
    weights = torch.randn(positions.shape[0], setting["search"] ** 2, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(0))

    def run(path):
        image = x.clone().requires_grad_()
        rows = ops.similarity_graph(image, positions, h=h, **setting, path=path)
        (rows * weights).sum().backward()
        sr = x.clone().requires_grad_()
        loss = ops.ssl_loss(sr, y, positions, h=h, kl_weight=1.0, l1_weight=2.0, **setting, path=path)
        loss.backward()
        unfused = torch.ops.metaf2n.ssl_loss_backward(
            torch.tensor(1.0, dtype=torch.float64), x, y, positions, setting["search"], setting["patch"], h, 1.0, 2.0,
            setting["padding"], path,
        )
        return rows.detach(), image.grad, loss.detach(), sr.grad, unfused

    direct, dense = both_paths(run)
    for a, b in zip(direct, dense):
        torch.testing.assert_close(b, a, atol=1e-12 * max(a.abs().max().item(), 1e-3), rtol=0)
    assert direct[1].abs().max() > 0 and direct[3].abs().max() > 0  # real gradients were compared


@pytest.mark.parametrize("setting", SETTINGS, ids=setting_id)
def test_dense_equals_direct_with_random_positions(setting):
    """Batch of 3, uneven numbers of rows per image, duplicates, rows on the borders, lines without rows."""
    size = (37, 41)
    x = smooth_random((3, 2, *size), seed=1).double()
    y = smooth_random((3, 2, *size), seed=2).double()
    positions = torch.cat([
        random_positions(3, *size, n=90, seed=3)[:70],
        torch.tensor([[0, 0, 0], [0, 36, 40], [2, 0, 40], [2, 36, 0], [1, 18, 20], [1, 18, 20]]),
    ])
    assert_paths_agree_in_float64(x, y, positions, setting)


@pytest.mark.parametrize("padding", ["image", "window"])
def test_dense_equals_direct_on_full_masks_spanning_several_bands(padding):
    """A full mask: lines dense in rows (the vector pass over a line), bands of 32 lines cut short at 2048 rows, and
    running sums recomputed every 8 lines."""
    x = smooth_random((1, 1, 75, 90), seed=4).double()
    y = smooth_random((1, 1, 75, 90), seed=5).double()
    positions = torch.nonzero(torch.ones(1, 75, 90, dtype=torch.bool))
    assert_paths_agree_in_float64(x, y, positions, {"search": 3, "patch": 3, "padding": padding})


@pytest.mark.parametrize("padding", ["image", "window"])
def test_dense_equals_direct_on_images_wider_than_a_column_tile(padding):
    """Bands are cut into tiles of 256 columns: rows on both sides of a tile border share candidate pixels."""
    x = smooth_random((2, 2, 40, 530), seed=13).double()
    y = smooth_random((2, 2, 40, 530), seed=14).double()
    border = torch.tensor([[b, yy, xx] for b in (0, 1) for yy in (0, 17, 39) for xx in (250, 255, 256, 260, 511, 512, 529)])
    positions = torch.cat([random_positions(2, 40, 530, n=150, seed=15), border])
    assert_paths_agree_in_float64(x, y, positions, {"search": 7, "patch": 5, "padding": padding})


@pytest.mark.parametrize("setting", [
    {"search": 7, "patch": 5, "padding": "image"},   # reflect-pads by 5
    {"search": 7, "patch": 5, "padding": "window"},  # reflect-pads by 3
    {"search": 5, "patch": 9, "padding": "window"},  # reflect-pads by 2
], ids=setting_id)
def test_images_barely_larger_than_the_padding(setting):
    pad = setting["search"] // 2 + (setting["patch"] // 2 if setting["padding"] == "image" else 0)
    g = torch.Generator().manual_seed(6)
    x = torch.rand(2, 3, pad + 1, pad + 2, dtype=torch.float64, generator=g)
    y = torch.rand(2, 3, pad + 1, pad + 2, dtype=torch.float64, generator=g)
    positions = torch.nonzero(torch.ones(2, pad + 1, pad + 2, dtype=torch.bool))
    assert_paths_agree_in_float64(x, y, positions, setting)
    rows = ops.similarity_graph(x, positions, h=0.05, **setting, path="dense")
    torch.testing.assert_close(rows, reference.similarity_graph(x, positions, h=0.05, **setting), atol=1e-12, rtol=0)


@pytest.mark.parametrize("padding", ["image", "window"])
def test_gradcheck_dense(padding):
    x = smooth_random((2, 2, 9, 10), seed=8).double().requires_grad_()
    hr = smooth_random((2, 2, 9, 10), seed=9).double()
    pos = torch.tensor([[0, 0, 0], [0, 4, 5], [1, 8, 9], [1, 2, 7], [1, 2, 7], [1, 2, 8]])
    assert torch.autograd.gradcheck(lambda img: ops.similarity_graph(img, pos, 5, 3, 0.05, padding, "dense"), (x,))
    sr = (hr + 0.05 * x.detach()).requires_grad_()
    for loss in (ops.ssl_loss, torch.ops.metaf2n.ssl_loss):  # fused loss-with-gradient, and forward + backward ops
        assert torch.autograd.gradcheck(
            lambda img, loss=loss: loss(img, hr, pos, 5, 3, 0.05, 1.0, 2.0, padding, "dense"), (sr,), atol=1e-7,
            rtol=1e-4,
        )


def _opcheck_samples():
    for padding in ("image", "window"):
        for path in ("dense", "auto", "direct"):
            x = smooth_random((2, 3, 12, 11), seed=10)
            hr = smooth_random((2, 3, 12, 11), seed=11)
            pos = random_positions(2, 12, 11, 9, seed=12)
            yield f"similarity_graph-{padding}-{path}", "similarity_graph", (
                x.clone().requires_grad_(), pos, 5, 3, 0.05, padding, path)
            yield f"ssl_loss-{padding}-{path}", "ssl_loss", (
                x.clone().requires_grad_(), hr, pos, 5, 3, 0.05, 1.0, 1.0, padding, path)
            yield f"ssl_loss_with_grad-{padding}-{path}", "ssl_loss_with_grad", (
                x.clone().requires_grad_(), hr, pos, 5, 3, 0.05, 1.0, 1.0, padding, path)
            rows = ops.similarity_graph(x, pos, 5, 3, 0.05, padding, path)
            yield f"similarity_graph_backward-{padding}-{path}", "similarity_graph_backward", (
                torch.randn_like(rows), rows, x, pos, 5, 3, 0.05, padding, path)
            yield f"ssl_loss_backward-{padding}-{path}", "ssl_loss_backward", (
                torch.tensor(1.5), x, hr, pos, 5, 3, 0.05, 1.0, 1.0, padding, path)


@pytest.mark.parametrize("sample", list(_opcheck_samples()), ids=lambda s: s[0])
def test_opcheck_with_the_path_argument(sample):
    _, name, args = sample
    torch.library.opcheck(getattr(torch.ops.metaf2n, name).default, args)


def test_dense_is_deterministic_across_thread_counts():
    hr = photo("astronaut", 100, 150, 96).expand(2, -1, -1, -1).contiguous()
    sr = photo("coffee", 50, 200, 96).expand(2, -1, -1, -1).contiguous()
    mask = edge_mask(hr)
    mask[1] = mask[1].flip(0)  # a different mask on the second image
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 3, 5, 8, 2):
            torch.set_num_threads(n)
            x = sr.clone().requires_grad_()
            loss = ssl_loss(x, hr, mask, path="dense")
            loss.backward()
            y = hr.clone().requires_grad_()
            rows = self_similarity_graph(y, mask, padding="window", path="dense")
            rows.pow(2).sum().backward()
            results.append(torch.cat([loss.detach().flatten(), x.grad.flatten(), rows.detach().flatten(), y.grad.flatten()]))
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        assert torch.equal(r, results[0])


@pytest.mark.parametrize("padding", ["image", "window"])
def test_float32_dense_rows_are_as_accurate_as_direct(padding):
    """Running box sums keep their rounding; recomputed every 8 lines they stay within 1e-5 of a row (float64
    reference), as the direct path does; without that they reached 1.3e-5 on this crop."""
    hr = photo("astronaut", 100, 150, 256)
    positions = torch.nonzero(edge_mask(hr))
    exact = ops.similarity_graph(hr.double(), positions, padding=padding, path="direct")
    for path in PATHS:
        rows = ops.similarity_graph(hr, positions, padding=padding, path=path).double()
        error = ((rows - exact).abs().amax(1) / exact.abs().amax(1)).max().item()
        assert error < 1e-5, (path, error)


def test_auto_takes_the_cheaper_path_and_returns_its_result(photo_pair):
    sr, hr = photo_pair
    full = torch.nonzero(torch.ones(2, 64, 64, dtype=torch.bool))
    one = torch.tensor([[0, 30, 30]])
    assert torch.ops.metaf2n._auto_path(hr, full, 25, 9, "image") == "dense"
    assert torch.ops.metaf2n._auto_path(hr, one, 25, 9, "image") == "direct"
    for positions, chosen in ((full, "dense"), (one, "direct")):
        x = sr.clone().requires_grad_()
        z = sr.clone().requires_grad_()
        auto = ops.ssl_loss(x, hr, positions)
        explicit = ops.ssl_loss(z, hr, positions, path=chosen)
        auto.backward()
        explicit.backward()
        assert torch.equal(auto, explicit) and torch.equal(x.grad, z.grad)
        assert torch.equal(ops.similarity_graph(hr, positions), ops.similarity_graph(hr, positions, path=chosen))


def test_auto_follows_the_measured_crossover():
    """csrc/ssg.cpp's estimate with kDenseCostRatio: on a 256^2 crop the crossover was measured at 4.6-5.0% of
    the pixels (bench/bench_ssl.py --sweep): auto takes direct below 3% and dense above 7%."""
    hr = photo("astronaut", 100, 150, 256)
    for stride, expected in ((8, "direct"), (4, "direct"), (1, "dense")):
        positions = torch.nonzero(edge_mask(hr, stride=stride))
        density = positions.shape[0] / 256**2
        assert (density < 0.03) == (expected == "direct") and (density > 0.07) == (expected == "dense")
        assert torch.ops.metaf2n._auto_path(hr, positions, 25, 9, "image") == expected


@pytest.mark.parametrize("path", ["Dense", "", "fast"])
def test_an_unknown_path_is_a_value_error_naming_it(photo_pair, path):
    sr, hr = photo_pair
    with pytest.raises(ValueError, match="path must be"):
        ssl_loss(sr, hr, path=path)
    with pytest.raises(ValueError, match="path must be"):
        self_similarity_graph(hr, edge_mask(hr), path=path)


def test_empty_mask_on_the_dense_path(photo_pair):
    sr, hr = photo_pair
    x = sr.clone().requires_grad_()
    loss = ssl_loss(x, hr, torch.zeros(2, 64, 64, dtype=torch.bool), path="dense")
    loss.backward()
    assert loss.item() == 0 and torch.count_nonzero(x.grad) == 0
    assert self_similarity_graph(hr, torch.zeros(2, 64, 64, dtype=torch.bool), path="dense").shape == (0, 625)


def test_the_path_argument_reaches_the_op_through_every_public_function(photo_pair):
    """In float32 the two paths add in different orders, so their last bits differ: a function that dropped its
    path argument would return auto's result for both."""
    sr, hr = photo_pair
    mask = torch.ones(2, 64, 64, dtype=torch.bool)
    positions = torch.nonzero(mask)
    weights = torch.randn(positions.shape[0], 625, generator=torch.Generator().manual_seed(0))

    def loss_and_grad(fn):
        x = sr.clone().requires_grad_()
        value = fn(x)
        value.backward()
        return torch.cat([value.detach().flatten(), x.grad.flatten()])

    calls = {
        "ops.similarity_graph": lambda path: ops.similarity_graph(hr, positions, path=path),
        "ops.ssl_loss": lambda path: loss_and_grad(lambda x: ops.ssl_loss(x, hr, positions, path=path)),
        # a float32 loss is summed in double and rounded once: its bits may agree, those of a float64 one do not
        "ops.ssl_loss (no grad)": lambda path: ops.ssl_loss(sr.double(), hr.double(), positions, path=path),
        "self_similarity_graph": lambda path: self_similarity_graph(hr, mask, path=path),
        "ssl_loss": lambda path: loss_and_grad(lambda x: ssl_loss(x, hr, mask, path=path)),
        "SelfSimilarityLoss": lambda path: loss_and_grad(lambda x: SelfSimilarityLoss(path=path)(x, hr, mask)),
        "ssl_loss_backward op": lambda path: torch.ops.metaf2n.ssl_loss_backward(
            torch.tensor(1.0), sr, hr, positions, 25, 9, 0.004, 1000.0, 1000.0, "image", path),
        "similarity_graph_backward op": lambda path: torch.ops.metaf2n.similarity_graph_backward(
            weights, ops.similarity_graph(hr, positions), hr, positions, 25, 9, 0.004, "image", path),
    }
    for name, call in calls.items():
        direct, dense = call("direct"), call("dense")
        torch.testing.assert_close(dense, direct, rtol=1e-4, atol=1e-6, msg=name)
        assert not torch.equal(dense, direct), name
