"""The self-similarity ops (CPU kernels) against the plain-PyTorch oracle, autograd, the dispatcher and bad input."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import photo

from metaf2n import ops, reference
from metaf2n.ssl import SelfSimilarityLoss, edge_mask, self_similarity_graph, ssl_loss

SETTINGS = [
    {"search": 25, "patch": 9, "padding": "image"},
    {"search": 25, "patch": 9, "padding": "window"},
    {"search": 7, "patch": 3, "padding": "image"},
    {"search": 11, "patch": 5, "padding": "window"},
    {"search": 9, "patch": 9, "padding": "image"},  # patch as large as the window
]


def smooth_random(shape, seed, sigma=1.5):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g)
    k = torch.exp(-torch.arange(-3, 4, dtype=torch.float32) ** 2 / (2 * sigma**2))
    k = k / k.sum()
    c = shape[1]
    x = F.conv2d(F.pad(x, (3, 3, 0, 0), mode="reflect"), k.view(1, 1, 1, 7).expand(c, 1, 1, 7), groups=c)
    x = F.conv2d(F.pad(x, (0, 0, 3, 3), mode="reflect"), k.view(1, 1, 7, 1).expand(c, 1, 7, 1), groups=c)
    return x


def random_positions(b, h, w, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.stack(
        [torch.randint(0, b, (n,), generator=g), torch.randint(0, h, (n,), generator=g), torch.randint(0, w, (n,), generator=g)],
        dim=1,
    )


# --- parity with the oracle -------------------------------------------------------------------------------------


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: f"{s['search']}-{s['patch']}-{s['padding']}")
def test_graph_matches_reference_on_photos(photo_pair, setting):
    _sr, hr = photo_pair
    mask = edge_mask(hr)
    assert mask[0].sum() != mask[1].sum()  # uneven masks across the batch
    rows = self_similarity_graph(hr, mask, **setting)
    # float32 kernels against a float64 oracle (a float32 oracle rounds differently per CPU); the bounds are those of
    # tests/test_dense.py::test_each_path_matches_the_oracle_on_photos
    expected = reference.similarity_graph(hr.double(), torch.nonzero(mask), **setting)
    assert rows.shape == (int(mask.sum()), setting["search"] ** 2)
    torch.testing.assert_close(rows.double(), expected, atol=2e-6, rtol=1e-4)
    torch.testing.assert_close(rows.sum(1), torch.ones(rows.shape[0]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: f"{s['search']}-{s['patch']}-{s['padding']}")
def test_loss_and_gradient_match_reference_on_photos(photo_pair, setting):
    sr, hr = photo_pair
    mask = edge_mask(hr)
    ours = sr.clone().requires_grad_()
    oracle = sr.double().requires_grad_()  # float64 oracle, float32 kernels (bounds as in tests/test_dense.py)
    loss = ssl_loss(ours, hr, mask, **setting)
    expected = reference.ssl_loss(oracle, hr.double(), torch.nonzero(mask), **setting)
    loss.backward()
    expected.backward()
    assert loss.item() > 1e-3  # a real, non-trivial loss
    torch.testing.assert_close(loss.double(), expected, atol=1e-6, rtol=1e-4)
    scale = oracle.grad.abs().max()
    assert scale > 0
    torch.testing.assert_close(ours.grad.double() / scale, oracle.grad / scale, atol=2e-5, rtol=0)


@pytest.mark.parametrize("padding", ["image", "window"])
@pytest.mark.parametrize("size", [(19, 23), (40, 33)])
def test_graph_and_gradient_match_reference_on_random_images(padding, size):
    x = smooth_random((3, 2, *size), seed=1)
    pos = random_positions(3, *size, n=60, seed=2)
    setting = {"search": 7, "patch": 5, "h": 0.01, "padding": padding}
    ours = x.clone().requires_grad_()
    oracle = x.double().requires_grad_()  # float64 oracle
    rows = ops.similarity_graph(ours, pos, **setting)
    expected = reference.similarity_graph(oracle, pos, **setting)
    torch.testing.assert_close(rows.double(), expected, atol=2e-6, rtol=1e-4)
    weights = torch.randn(rows.shape, generator=torch.Generator().manual_seed(3))
    (rows * weights).sum().backward()
    (expected * weights.double()).sum().backward()
    torch.testing.assert_close(ours.grad.double(), oracle.grad, atol=1e-5 * oracle.grad.abs().max().item(), rtol=0)


def test_duplicate_positions_count_twice():
    x = smooth_random((1, 3, 20, 20), seed=4)
    y = smooth_random((1, 3, 20, 20), seed=5)
    pos = torch.tensor([[0, 5, 6], [0, 5, 6], [0, 12, 3]])
    ours = x.clone().requires_grad_()
    oracle = x.double().requires_grad_()  # float64 oracle
    ops.ssl_loss(ours, y, pos, search=5, patch=3, h=0.05).backward()
    reference.ssl_loss(oracle, y.double(), pos, search=5, patch=3, h=0.05).backward()
    torch.testing.assert_close(ours.grad.double(), oracle.grad, atol=1e-6, rtol=1e-4)


def test_loss_equals_mean_of_graph_terms(photo_pair):
    """The fused loss equals the KL + L1 of the two graphs the graph op returns."""
    sr, hr = photo_pair
    mask = edge_mask(hr)
    s_sr = self_similarity_graph(sr, mask)
    s_hr = self_similarity_graph(hr, mask)
    t = s_hr.clamp_min(1e-10)
    kl = (t * (t.log() - s_sr.clamp_min(1e-10).log())).mean()
    l1 = (s_sr - s_hr).abs().mean()
    torch.testing.assert_close(ssl_loss(sr, hr, mask, kl_weight=3.0, l1_weight=0.5), 3.0 * kl + 0.5 * l1, rtol=1e-4, atol=1e-7)


# --- autograd, dispatcher, compile ------------------------------------------------------------------------------


@pytest.mark.parametrize("padding", ["image", "window"])
def test_gradcheck_graph(padding):
    x = smooth_random((2, 2, 9, 10), seed=6).double().requires_grad_()
    pos = torch.tensor([[0, 0, 0], [0, 4, 5], [1, 8, 9], [1, 2, 7]])
    assert torch.autograd.gradcheck(lambda img: ops.similarity_graph(img, pos, 5, 3, 0.05, padding), (x,))


LOSS_PATHS = {
    # what ops.ssl_loss runs when sr needs a gradient: loss and gradient in one pass
    "fused_with_grad": lambda *args: ops.ssl_loss(*args),
    # the plain op with its own backward op
    "forward_then_backward": lambda *args: torch.ops.metaf2n.ssl_loss(*args),
}


@pytest.mark.parametrize("path", LOSS_PATHS)
@pytest.mark.parametrize("padding", ["image", "window"])
def test_gradcheck_loss(padding, path):
    hr = smooth_random((2, 2, 9, 10), seed=7).double()
    sr = (hr + 0.05 * smooth_random((2, 2, 9, 10), seed=8).double()).requires_grad_()
    pos = torch.tensor([[0, 0, 0], [0, 4, 5], [1, 8, 9], [1, 2, 7], [1, 2, 7]])
    loss = LOSS_PATHS[path]
    assert torch.autograd.gradcheck(lambda img: loss(img, hr, pos, 5, 3, 0.05, 1.0, 2.0, padding), (sr,), atol=1e-7, rtol=1e-4)


def test_both_loss_paths_agree(photo_pair):
    sr, hr = photo_pair
    pos = torch.nonzero(edge_mask(hr))
    grads = []
    for loss in LOSS_PATHS.values():
        x = sr.clone().requires_grad_()
        value = loss(x, hr, pos, 25, 9, 0.004, 1000.0, 1000.0, "image")
        (3 * value).backward()
        grads.append((value.detach(), x.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])
    with torch.no_grad():
        torch.testing.assert_close(ops.ssl_loss(sr, hr, pos), grads[0][0])


def test_gradient_output_of_fused_op_is_not_differentiable(photo_pair):
    sr, hr = photo_pair
    x = sr.clone().requires_grad_()
    _, grad = torch.ops.metaf2n.ssl_loss_with_grad(x, hr, torch.nonzero(edge_mask(hr)), 25, 9, 0.004, 1.0, 1.0, "image")
    assert not grad.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        grad.sum().backward()


def _opcheck_samples():
    for padding in ("image", "window"):
        x = smooth_random((2, 3, 12, 11), seed=9)
        pos = random_positions(2, 12, 11, 7, seed=10)
        yield "similarity_graph", (x.clone().requires_grad_(), pos, 5, 3, 0.05, padding)
        yield "similarity_graph", (x.double(), pos.int(), 3, 1, 1.0, padding)
        hr = smooth_random((2, 3, 12, 11), seed=11)
        yield "ssl_loss", (x.clone().requires_grad_(), hr, pos, 5, 3, 0.05, 1.0, 1.0, padding)
        yield "ssl_loss_with_grad", (x.clone().requires_grad_(), hr, pos, 5, 3, 0.05, 1.0, 1.0, padding)
    yield "similarity_graph", (torch.rand(1, 1, 8, 8), torch.zeros(0, 3, dtype=torch.long), 3, 3, 0.1, "image")


@pytest.mark.parametrize("sample", list(_opcheck_samples()), ids=lambda s: s[0])
def test_opcheck(sample):
    name, args = sample
    torch.library.opcheck(getattr(torch.ops.metaf2n, name).default, args)


def test_opcheck_backward_ops():
    x = smooth_random((1, 2, 10, 10), seed=12)
    pos = random_positions(1, 10, 10, 5, seed=13)
    rows = ops.similarity_graph(x, pos, 5, 3, 0.05)
    torch.library.opcheck(
        torch.ops.metaf2n.similarity_graph_backward.default, (torch.randn_like(rows), rows, x, pos, 5, 3, 0.05, "image")
    )
    torch.library.opcheck(
        torch.ops.metaf2n.ssl_loss_backward.default, (torch.tensor(1.0), x, x.flip(3), pos, 5, 3, 0.05, 1.0, 1.0, "image")
    )


@pytest.mark.skipif(os.environ.get("ATEN_CPU_CAPABILITY") == "default",
                    reason="torch's inductor emits at::vec code that does not compile with ATEN_CPU_CAPABILITY=default "
                           "('at::vec has not been declared'), outside this project")
def test_torch_compile_of_a_training_step(photo_pair):
    sr, hr = photo_pair

    def step(sr, hr):
        return F.l1_loss(sr, hr) + 0.1 * ssl_loss(sr, hr, search=11, patch=5)

    compiled = torch.compile(step)
    ours = sr.clone().requires_grad_()
    eager = sr.clone().requires_grad_()
    loss = compiled(ours, hr)
    expected = step(eager, hr)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(ours.grad, eager.grad)


def test_autocast_runs_in_float32(photo_pair):
    sr, hr = photo_pair
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ssl_loss(sr.bfloat16(), hr.bfloat16(), edge_mask(hr))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ssl_loss(sr.bfloat16().float(), hr.bfloat16().float()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_inputs_are_computed_in_float32(photo_pair, dtype):
    sr, hr = photo_pair
    mask = edge_mask(hr)
    x = sr.to(dtype).requires_grad_()
    loss = ssl_loss(x, hr.to(dtype), mask)
    loss.backward()
    assert loss.dtype == dtype and x.grad.dtype == dtype
    expected = ssl_loss(sr.to(dtype).float(), hr.to(dtype).float(), mask)
    torch.testing.assert_close(loss.float(), expected, rtol=1e-2, atol=0)


def test_noncontiguous_and_channels_last_inputs(photo_pair):
    sr, hr = photo_pair
    mask = edge_mask(hr)
    base = ssl_loss(sr, hr, mask)
    cl_sr = sr.contiguous(memory_format=torch.channels_last).requires_grad_()
    loss = ssl_loss(cl_sr, hr.contiguous(memory_format=torch.channels_last), mask)
    loss.backward()
    torch.testing.assert_close(loss, base)
    ref_sr = sr.clone().requires_grad_()
    ssl_loss(ref_sr, hr, mask).backward()
    torch.testing.assert_close(cl_sr.grad, ref_sr.grad)
    # A strided view: every other column of a wider image.
    wide = torch.stack([hr, hr], dim=-1).flatten(-2)[..., ::2]
    assert not wide.is_contiguous()
    torch.testing.assert_close(self_similarity_graph(wide, mask), self_similarity_graph(hr, mask))


def test_batch_rows_are_independent(photo_pair):
    _sr, hr = photo_pair
    mask = edge_mask(hr)
    both = self_similarity_graph(hr, mask)
    first = self_similarity_graph(hr[:1], mask[:1])
    second = self_similarity_graph(hr[1:], mask[1:])
    torch.testing.assert_close(both, torch.cat([first, second]))


def test_backward_is_deterministic_across_thread_counts(photo_pair):
    sr, hr = photo_pair
    mask = edge_mask(hr)
    grads = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 3, 5, 8, 2):
            torch.set_num_threads(n)
            x = sr.clone().requires_grad_()
            ssl_loss(x, hr, mask).backward()
            y = hr.clone().requires_grad_()
            self_similarity_graph(y, mask).pow(2).sum().backward()
            grads.append(torch.cat([x.grad.flatten(), y.grad.flatten()]))
    finally:
        torch.set_num_threads(threads)
    for g in grads[1:]:
        assert torch.equal(g, grads[0])


def test_empty_mask_gives_zero_loss_and_zero_gradient(photo_pair):
    sr, hr = photo_pair
    x = sr.clone().requires_grad_()
    loss = ssl_loss(x, hr, torch.zeros(hr.shape[0], *hr.shape[2:], dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(x.grad, torch.zeros_like(sr))
    flat = torch.full_like(hr, 0.5)
    assert edge_mask(flat).sum() == 0
    assert ssl_loss(flat, flat).item() == 0.0


def test_nan_input_gives_nan_not_a_crash(photo_pair):
    sr, hr = photo_pair
    mask = edge_mask(hr)
    bad = sr.clone()
    bad[0, :, 10:20, 10:20] = float("nan")
    bad.requires_grad_()
    loss = ssl_loss(bad, hr, mask)
    loss.backward()
    assert torch.isnan(loss)
    assert torch.isnan(self_similarity_graph(bad.detach(), mask)).any()


def test_hr_gets_no_gradient(photo_pair):
    sr, hr = photo_pair
    x = sr.clone().requires_grad_()
    y = hr.clone().requires_grad_()
    ops.ssl_loss(x, y, torch.nonzero(edge_mask(hr))).backward()
    assert y.grad is None and x.grad is not None


def test_module_matches_function(photo_pair):
    sr, hr = photo_pair
    module = SelfSimilarityLoss(search=11, patch=5, h=0.01, padding="window", stride=2)
    assert "padding='window'" in repr(module)
    torch.testing.assert_close(module(sr, hr), ssl_loss(sr, hr, search=11, patch=5, h=0.01, padding="window", stride=2))


# --- edge mask --------------------------------------------------------------------------------------------------


def published_mask(rgb: np.ndarray, threshold: float = 20) -> torch.Tensor:
    """The published mask generator: PIL's convert("L"), OpenCV's 3x3 Laplacian into CV_8U, > threshold."""
    from PIL import Image

    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    response = cv2.Laplacian(grey, cv2.CV_8U, ksize=1)  # uint8 output: negatives saturate to 0
    return torch.from_numpy(response > threshold)


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry"])
def test_edge_mask_equals_the_published_mask_on_whole_photos(name):
    import skimage.data

    rgb = np.ascontiguousarray(getattr(skimage.data, name)()[..., :3])
    hr = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    mask = edge_mask(hr)
    assert mask.dtype == torch.bool and mask.shape == (1, *rgb.shape[:2])
    assert torch.equal(mask[0], published_mask(rgb))
    assert 0 < mask.float().mean() < 0.5


def test_edge_mask_uses_pils_luma_not_opencvs():
    # a colour whose 8-bit luma differs between the two fixed-point formulas decides the edge
    import skimage.data

    rgb = np.ascontiguousarray(skimage.data.astronaut())
    hr = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    opencv_grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    opencv_mask = torch.from_numpy(cv2.Laplacian(opencv_grey, cv2.CV_8U, ksize=1) > 20)
    assert not torch.equal(opencv_mask, published_mask(rgb))  # the two differ on this photo ...
    assert torch.equal(edge_mask(hr)[0], published_mask(rgb))  # ... and we follow the published one


def test_edge_mask_stride_and_threshold():
    hr = photo("astronaut", 0, 0, 128)
    full = edge_mask(hr)
    strided = edge_mask(hr, stride=3)
    ys, xs = torch.meshgrid(torch.arange(128), torch.arange(128), indexing="ij")
    assert torch.equal(strided[0], full[0] & ((ys - xs) % 3 == 0))
    assert edge_mask(hr, threshold=60).sum() < full.sum()
    grey = hr.mean(1, keepdim=True)
    assert edge_mask(grey).shape == (1, 128, 128)


# --- bad input --------------------------------------------------------------------------------------------------

X = torch.rand(1, 3, 40, 40)
POS = torch.tensor([[0, 5, 5]])


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda: ssl_loss(X[0], X[0]), ValueError, "sr must be a (B, C, H, W)"),
        (lambda: ssl_loss(X, X[:, :2], torch.ones(1, 40, 40, dtype=torch.bool)), ValueError,
         "hr must have the shape of sr"),
        (lambda: ssl_loss(X, X[..., :39]), ValueError, "hr must have the shape of sr"),
        (lambda: ops.ssl_loss(X, X[:, :2], POS), ValueError, "same shape"),
        (lambda: ssl_loss(X, X, kl_weight=-1.0), ValueError, "kl_weight must be a finite number >= 0"),
        (lambda: ssl_loss(X, X, l1_weight=float("nan")), ValueError, "l1_weight must be a finite number >= 0"),
        (lambda: ops.ssl_loss(X, X, POS, 25, 9, 0.004, 1.0, -0.5), ValueError, "l1_weight must be"),
        (lambda: ssl_loss(X, X, threshold="20"), TypeError, "threshold must be a number"),
        (lambda: ssl_loss(X, X, threshold=float("nan")), ValueError, "threshold must be finite"),
        (lambda: ssl_loss(X, X.double()), TypeError, "same dtype"),
        (lambda: ssl_loss((X * 255).to(torch.uint8), X), TypeError, "sr must be a floating"),
        (lambda: ssl_loss(X, X, torch.ones(1, 40, 39, dtype=torch.bool)), ValueError, "mask must have shape"),
        (lambda: ssl_loss(X, X, torch.ones(1, 40, 40)), TypeError, "mask must be a bool"),
        (lambda: ssl_loss(X, X, search=24), ValueError, "search must be"),
        (lambda: ssl_loss(X, X, patch=4), ValueError, "patch must be"),
        (lambda: ssl_loss(X, X, patch=33), ValueError, "patch must be"),
        (lambda: ssl_loss(X, X, h=0.0), ValueError, "h must be"),
        (lambda: ssl_loss(X, X, h=float("nan")), ValueError, "h must be"),
        (lambda: ssl_loss(X, X, padding="zeros"), ValueError, "padding must be"),
        (lambda: ssl_loss(X, X, kl_weight=float("inf")), ValueError, "kl_weight"),
        (lambda: ssl_loss(X[..., :16, :16], X[..., :16, :16]), ValueError, "smaller than the window"),
        (lambda: ssl_loss(X[..., :12, :], X[..., :12, :], padding="window"), ValueError, "smaller than the window"),
        (lambda: ops.similarity_graph(X, torch.tensor([[0, 40, 3]])), ValueError, "positions column 1"),
        (lambda: ops.similarity_graph(X, torch.tensor([[1, 4, 3]])), ValueError, "positions column 0"),
        (lambda: ops.similarity_graph(X, torch.tensor([[0, 4, -1]])), ValueError, "positions column 2"),
        (lambda: ops.similarity_graph(X, POS.float()), TypeError, "positions must be an int64"),
        (lambda: ops.similarity_graph(X, POS[:, :2]), ValueError, "positions must have shape"),
        (lambda: ops.similarity_graph(X, POS.to("meta")), ValueError, "positions must be on"),
        (lambda: ops.ssl_loss(X, X.to("meta"), POS), ValueError, "hr must be on"),
        (lambda: ssl_loss(X, X, torch.ones(1, 40, 40, dtype=torch.bool, device="meta")), ValueError, "mask must be on"),
        (lambda: edge_mask(X, stride=0), ValueError, "stride"),
        (lambda: edge_mask(X[:, :2]), ValueError, "1 or 3 channels"),
        (lambda: ssl_loss("image", X), TypeError, "sr must be a torch.Tensor, got str"),
        (lambda: ssl_loss(X, "image"), TypeError, "hr must be a torch.Tensor, got str"),
    ],
)
def test_bad_input_is_reported_by_name(call, error, words):
    with pytest.raises(error, match=None) as info:
        call()
    assert words in str(info.value), str(info.value)


def test_window_padding_accepts_smaller_images_than_image_padding():
    x = smooth_random((1, 3, 14, 14), seed=14).double()  # the defaults pad by 12 ("window") or 16 ("image")
    mask = edge_mask(x, threshold=0)
    expected = reference.ssl_loss(x.flip(3), x, torch.nonzero(mask), padding="window")
    torch.testing.assert_close(ssl_loss(x.flip(3), x, mask, padding="window"), expected)
    with pytest.raises(ValueError, match="smaller than the window"):
        ssl_loss(x, x.flip(3), padding="image")


def test_has_cuda_kernels_matches_the_dispatcher():
    registered = torch._C._dispatch_has_kernel_for_dispatch_key("metaf2n::ssl_loss", "CUDA")
    assert ops.has_cuda_kernels() is registered


# --- second derivatives -----------------------------------------------------------------------------------------


def _double_backward_cases(sr, hr):
    mask = edge_mask(hr)
    pos = torch.nonzero(mask)
    yield "metaf2n.ssl_loss", lambda x: ssl_loss(x, hr, mask)  # the fused loss-with-gradient path
    yield "metaf2n.ssl_loss", lambda x: torch.ops.metaf2n.ssl_loss(x, hr, pos, 25, 9, 0.004, 1000.0, 1000.0, "image")
    yield "metaf2n.similarity_graph", lambda x: (self_similarity_graph(x, mask) ** 2).sum()


def test_a_second_derivative_through_the_ssl_raises_instead_of_being_dropped(photo_pair):
    sr0, hr = photo_pair
    for name, f in _double_backward_cases(sr0, hr):
        sr = sr0.clone().requires_grad_()
        (plain,) = torch.autograd.grad(f(sr), sr)
        (first,) = torch.autograd.grad(f(sr), sr, create_graph=True)
        torch.testing.assert_close(first.detach(), plain)  # create_graph alone changes nothing
        with pytest.raises(RuntimeError, match=f"second derivatives of {name} are not implemented") as info:
            (first * first).sum().backward()
        message = str(info.value)
        assert (f"second derivatives of {name} are not implemented: its gradient was differentiated again (a "
                "backward with create_graph=True followed by another backward through it).") in message
        assert message.endswith(("through it).", ("Keep the SSL out of double-backward paths, e.g. outside the inner "
                                 "loop of a second-order meta-step.")))


# --- README claims ----------------------------------------------------------------------------------------------


def _largest_allocation(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max([e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0] + [0])


def test_the_fused_loss_never_allocates_an_n_by_k_tensor(photo_pair):
    sr, hr = photo_pair
    mask = edge_mask(hr)
    n, k = int(mask.sum()), 25 * 25
    nk_bytes = n * k * 4

    def ours():
        x = sr.clone().requires_grad_()
        ssl_loss(x, hr, mask).backward()

    def building_rows():  # the positive control: the reference holds all N x K rows at once
        x = sr.clone().requires_grad_()
        reference.ssl_loss(x, hr, torch.nonzero(mask), chunk=n).backward()

    assert _largest_allocation(building_rows) >= nk_bytes  # the check can see an N x K tensor ...
    assert _largest_allocation(ours) < nk_bytes / 2  # ... and the fused loss has none


def test_nan_in_hr_gives_a_nan_loss_and_gradient(photo_pair):
    sr, hr = photo_pair
    mask = edge_mask(hr)
    bad = hr.clone()
    pos = torch.nonzero(mask)[0]
    bad[pos[0], 1, pos[1], pos[2]] = float("nan")
    x = sr.clone().requires_grad_()
    loss = ssl_loss(x, bad, mask)
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(x.grad).any()


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 6e-2)])
def test_reduced_precision_gradients_match_float32(photo_pair, dtype, tol):
    sr, hr = photo_pair
    mask = edge_mask(hr)
    low = sr.to(dtype).requires_grad_()
    ssl_loss(low, hr.to(dtype), mask).backward()
    full = sr.to(dtype).float().requires_grad_()  # the same rounded values, computed in float32
    ssl_loss(full, hr.to(dtype).float(), mask).backward()
    scale = full.grad.abs().max()
    assert (low.grad.float() - full.grad).abs().max() <= tol * scale


# --- arguments that must reach the edge mask ----------------------------------------------------------------------


@pytest.mark.parametrize("argument", [{"stride": 3}, {"threshold": 45.0}, {"stride": 2, "threshold": 10}])
def test_ssl_loss_passes_stride_and_threshold_to_the_edge_mask(photo_pair, argument):
    sr, hr = photo_pair
    small = {"search": 11, "patch": 5}
    mask = edge_mask(hr, **argument)
    assert not torch.equal(mask, edge_mask(hr))  # the argument changes the mask ...
    loss = ssl_loss(sr, hr, **small, **argument)
    torch.testing.assert_close(loss, ssl_loss(sr, hr, mask, **small), rtol=0, atol=0)  # ... and reaches it
    assert loss != ssl_loss(sr, hr, **small)
    module = SelfSimilarityLoss(**small, **argument)
    torch.testing.assert_close(module(sr, hr), loss, rtol=0, atol=0)


def test_module_passes_every_argument():
    sr, hr = smooth_random((1, 3, 32, 32), seed=3), smooth_random((1, 3, 32, 32), seed=4)
    settings = {"search": 7, "patch": 3, "h": 0.02, "kl_weight": 2.0, "l1_weight": 5.0, "padding": "window",
                "threshold": 5.0, "stride": 2, "path": "direct"}
    expected = ssl_loss(sr, hr, **settings)
    torch.testing.assert_close(SelfSimilarityLoss(**settings)(sr, hr), expected, rtol=0, atol=0)
    for name, other in (("h", 0.05), ("kl_weight", 1.0), ("l1_weight", 1.0), ("padding", "image"),
                        ("threshold", 15.0), ("stride", 1), ("search", 5), ("patch", 5)):
        assert SelfSimilarityLoss(**{**settings, name: other})(sr, hr) != expected, name


def test_grey_edge_mask_is_opencvs_laplacian_of_the_grey_image():
    hr = photo("coffee", 60, 100, 96)
    grey_u8 = (hr.mean(1, keepdim=True) * 255).round().to(torch.uint8)
    grey = grey_u8.float() / 255
    response = cv2.Laplacian(grey_u8[0, 0].numpy(), cv2.CV_8U, ksize=1)  # reflect-101 borders, saturated to 0..255
    for threshold in (20, 7.5):
        expected = torch.from_numpy(response > threshold)
        assert torch.equal(edge_mask(grey, threshold)[0], expected)
        assert torch.equal(edge_mask(grey.expand(1, 3, 96, 96), threshold)[0], expected)  # R = G = B: luma = grey
    assert 0 < expected.float().mean() < 0.5


def test_edge_mask_argument_edges():
    x = photo("astronaut", 0, 0, 32)
    # values outside [0, 1] are clamped before quantising
    assert torch.equal(edge_mask(x * 3 - 1), edge_mask((x * 3 - 1).clamp(0, 1)))
    assert edge_mask(x[..., :2, :2]).shape == (1, 2, 2)
    for call, error, words in (
        (lambda: edge_mask(x, threshold=True), TypeError, "threshold must be a number"),
        (lambda: edge_mask(x, stride=1.0), ValueError, "stride must be a positive int"),
        (lambda: edge_mask(x[..., :1, :], threshold=0), ValueError, "at least 2x2"),
        (lambda: edge_mask(x[..., :, :1], threshold=0), ValueError, "at least 2x2"),
        (lambda: edge_mask(x[0]), ValueError, "hr must be a (B, C, H, W)"),
        (lambda: ssl_loss(x, x, [[True]]), TypeError, "mask must be a torch.Tensor"),
        (lambda: self_similarity_graph(x[0], torch.ones(1, 32, 32, dtype=torch.bool)), ValueError, "img must be"),
    ):
        with pytest.raises(error) as info:
            call()
        assert words in str(info.value), str(info.value)


def test_module_defaults_and_mask_are_the_functions(photo_pair):
    sr, hr = photo_pair
    torch.testing.assert_close(SelfSimilarityLoss()(sr, hr), ssl_loss(sr, hr), rtol=0, atol=0)
    mask = edge_mask(hr, threshold=60.0)
    torch.testing.assert_close(SelfSimilarityLoss()(sr, hr, mask), ssl_loss(sr, hr, mask), rtol=0, atol=0)
    assert SelfSimilarityLoss()(sr, hr, mask) != SelfSimilarityLoss()(sr, hr)


def test_a_bool_where_a_size_is_meant_is_refused(photo_pair):
    sr, hr = photo_pair
    with pytest.raises(TypeError, match=r"^search must be an int, got True$"):
        ssl_loss(sr, hr, search=True)
    with pytest.raises(TypeError, match=r"^patch must be an int, got 3.0$"):
        self_similarity_graph(hr, edge_mask(hr), patch=3.0)
    with pytest.raises(TypeError, match=r"^kl_weight must be a number, got '1'$"):
        ssl_loss(sr, hr, kl_weight="1")


def test_images_in_0_255_are_refused_instead_of_giving_zero(photo_pair):
    sr, hr = photo_pair
    with pytest.raises(ValueError, match=r"^hr must hold values in \[0, 1\], got a maximum of 2\d\d.*divide it by 255"):
        ssl_loss(sr, hr * 255)
    with pytest.raises(ValueError, match=r"^hr must hold values in \[0, 1\], got a maximum of 2\d\d"):
        ssl_loss(sr * 255, hr * 255)  # both 8-bit: every distance huge, the loss would be 0
    # a network's output may lie anywhere (an untrained network's does): only the ground truth is checked
    assert ssl_loss(sr * 12 - 1, hr) > 0
