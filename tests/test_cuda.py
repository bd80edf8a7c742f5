"""CUDA kernels of the self-similarity ops: parity with the CPU ops and the plain-PyTorch oracle, gradients,
determinism, batching and edge cases.

Every test but the first needs a CUDA GPU and a build with the CUDA kernels; the first checks on any machine that a
CUDA build registered its kernels with the dispatcher. The CPU op run in float64 on the same (quantised) inputs is
the oracle for the parity tests; tolerances are stated per dtype in ``TOL``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import metaf2n.ops as ops
import metaf2n.reference as reference
import metaf2n.ssl as ssl

pytestmark = pytest.mark.cuda

OPS = (
    "metaf2n::similarity_graph",
    "metaf2n::similarity_graph_backward",
    "metaf2n::ssl_loss",
    "metaf2n::ssl_loss_backward",
    "metaf2n::ssl_loss_with_grad",
)

_HAS_GPU = torch.cuda.is_available()
_HAS_KERNELS = ops.has_cuda_kernels()
needs_gpu = pytest.mark.skipif(
    not (_HAS_GPU and _HAS_KERNELS),
    reason="needs a CUDA GPU and metaf2n built with its CUDA kernels"
    + ("" if _HAS_GPU else " (torch.cuda.is_available() is False)")
    + ("" if _HAS_KERNELS else " (this build has no CUDA kernels: METAF2N_CUDA=OFF, or no nvcc / CUDA torch)"),
)

# Tolerances against the float64 CPU op on the same input values: rows (absolute), loss (relative) and
# gradients (absolute, relative to the largest gradient entry). The kernels accumulate in float32 (float64 for
# float64 inputs); half and bfloat16 results are rounded to their dtype on output.
TOL = {
    torch.float64: dict(rows=1e-10, loss=1e-9, grad=1e-8),
    torch.float32: dict(rows=2e-5, loss=1e-4, grad=2e-4),
    torch.float16: dict(rows=2e-3, loss=2e-3, grad=4e-3),
    torch.bfloat16: dict(rows=1.6e-2, loss=1.6e-2, grad=1.6e-2),
}
DTYPES = tuple(TOL)


def _has_op(name: str) -> bool:
    try:
        getattr(torch.ops.metaf2n, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def test_cuda_kernels_registered():
    """Runs without a GPU: a CUDA build must register a CUDA kernel for every op."""
    if not _HAS_KERNELS:
        pytest.skip("this build of metaf2n has no CUDA kernels (METAF2N_CUDA=OFF, or no nvcc / CUDA torch)")
    ops_ = OPS + (("metaf2n::ssl_loss_with_grad",) if _has_op("ssl_loss_with_grad") else ())
    missing = [op for op in ops_ if not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")]
    assert not missing, f"no CUDA kernel registered for {missing}"


# --- data ---------------------------------------------------------------------------------------------------------


def _photo(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """Crops (batch, 3, size, size) in [0, 1] of the skimage astronaut photo at seeded offsets, float64 on the CPU."""
    data = pytest.importorskip("skimage.data")
    img = torch.from_numpy(np.ascontiguousarray(data.astronaut())).permute(2, 0, 1).double() / 255
    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(batch):
        y, x = rng.integers(0, img.shape[1] - size + 1), rng.integers(0, img.shape[2] - size + 1)
        crops.append(img[:, y : y + size, x : x + size])
    return torch.stack(crops)


def _blurred_noise(shape, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=torch.float64)
    k = (k[:, None] * k[None, :] / 256).expand(shape[1], 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), k, groups=shape[1]).clamp(0, 1)


def _degrade(hr: torch.Tensor) -> torch.Tensor:
    """A plausible SR output: bicubic down x2 / up x2 of hr."""
    h, w = hr.shape[-2:]
    low = F.interpolate(hr, size=(h // 2, w // 2), mode="bicubic", align_corners=False, antialias=True)
    return F.interpolate(low, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)


def _positions(hr: torch.Tensor, limit: int | None = None, seed: int = 0) -> torch.Tensor:
    """Edge-mask positions of hr (uneven across the batch), optionally a seeded subset of at most `limit` rows."""
    pos = ssl.mask_positions(ssl.edge_mask(hr), hr)
    if limit is not None and pos.shape[0] > limit:
        keep = torch.randperm(pos.shape[0], generator=torch.Generator().manual_seed(seed))[:limit]
        pos = pos[keep.sort().values]
    return pos


def _cuda(t: torch.Tensor, dtype=None) -> torch.Tensor:
    return t.to(device="cuda", dtype=dtype or t.dtype)


def _grad_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double().cpu() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def _cpu_graph(img, pos, search, patch, h, padding, grad_rows):
    x = img.detach().double().cpu().requires_grad_()
    rows = ops.similarity_graph(x, pos.cpu(), search, patch, h, padding)
    (g,) = torch.autograd.grad((rows * grad_rows.double().cpu()).sum(), x)
    return rows.detach(), g


def _cpu_loss(sr, hr, pos, search, patch, h, padding, kl=1000.0, l1=1000.0):
    x = sr.detach().double().cpu().requires_grad_()
    loss = ops.ssl_loss(x, hr.detach().double().cpu(), pos.cpu(), search, patch, h, kl, l1, padding)
    (g,) = torch.autograd.grad(loss, x)
    return loss.detach(), g


# --- parity -------------------------------------------------------------------------------------------------------

CONFIGS = [  # (search, patch, h, padding)
    (25, 9, 0.004, "image"),
    (25, 9, 0.004, "window"),
    (7, 5, 0.01, "image"),
    (11, 3, 0.02, "window"),
    (5, 7, 0.05, "window"),  # patch radius > search radius: query pixels outside the window read 0
    (15, 13, 0.01, "image"),  # partial register blocks
]


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"s{c[0]}p{c[1]}-{c[3]}")
def test_graph_parity(config, dtype):
    search, patch, h, padding = config
    hr = torch.cat([_photo(2, 48, seed=1), _blurred_noise((1, 3, 48, 48), seed=2)])
    pos = _positions(hr, limit=40)
    img = hr.to(dtype)  # quantise first: the CPU oracle sees the same values
    grad_rows = torch.randn(pos.shape[0], search * search, generator=torch.Generator().manual_seed(3))
    rows_ref, g_ref = _cpu_graph(img, pos, search, patch, h, padding, grad_rows)

    x = _cuda(img).requires_grad_()
    rows = ops.similarity_graph(x, _cuda(pos), search, patch, h, padding)
    assert rows.dtype == dtype and rows.shape == rows_ref.shape
    torch.testing.assert_close(rows.double().cpu(), rows_ref, rtol=0, atol=TOL[dtype]["rows"])
    (g,) = torch.autograd.grad(rows, x, _cuda(grad_rows, dtype))
    assert g.dtype == dtype and g.shape == x.shape
    # the incoming gradient was rounded to dtype too
    _, g_ref = _cpu_graph(img, pos, search, patch, h, padding, grad_rows.to(dtype))
    assert _grad_err(g, g_ref) < TOL[dtype]["grad"]


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"s{c[0]}p{c[1]}-{c[3]}")
def test_loss_parity(config, dtype):
    search, patch, h, padding = config
    hr = torch.cat([_photo(2, 48, seed=4), _blurred_noise((1, 3, 48, 48), seed=5)])
    sr = _degrade(hr)
    pos = _positions(hr, limit=40)
    sr_q, hr_q = sr.to(dtype), hr.to(dtype)
    loss_ref, g_ref = _cpu_loss(sr_q, hr_q, pos, search, patch, h, padding)

    # torch.ops.metaf2n.ssl_loss differentiates with ssl_loss_backward; ops.ssl_loss may use ssl_loss_with_grad.
    for fn in (torch.ops.metaf2n.ssl_loss, ops.ssl_loss):
        x = _cuda(sr_q).requires_grad_()
        loss = fn(x, _cuda(hr_q), _cuda(pos), search, patch, h, 1000.0, 1000.0, padding)
        assert loss.dtype == dtype and loss.dim() == 0
        torch.testing.assert_close(loss.double().cpu(), loss_ref, rtol=TOL[dtype]["loss"], atol=0)
        (g,) = torch.autograd.grad(loss, x)
        assert g.dtype == dtype and g.shape == x.shape
        assert _grad_err(g, g_ref) < TOL[dtype]["grad"]
    with torch.no_grad():
        loss = ops.ssl_loss(_cuda(sr_q), _cuda(hr_q), _cuda(pos), search, patch, h, 1000.0, 1000.0, padding)
    torch.testing.assert_close(loss.double().cpu(), loss_ref, rtol=TOL[dtype]["loss"], atol=0)


@needs_gpu
@pytest.mark.parametrize("padding", ["image", "window"])
def test_parity_with_reference(padding):
    """The CUDA ops against the plain-PyTorch oracle (autograd through unfold) on the GPU, float64."""
    hr = _photo(2, 40, seed=6)
    sr = _degrade(hr)
    pos = _cuda(_positions(hr, limit=30))
    x, t = _cuda(sr).requires_grad_(), _cuda(hr)
    loss = ops.ssl_loss(x, t, pos, 9, 5, 0.01, 3.0, 2.0, padding)
    (g,) = torch.autograd.grad(loss, x)
    xr = _cuda(sr).requires_grad_()
    loss_ref = reference.ssl_loss(xr, t, pos, 9, 5, 0.01, 3.0, 2.0, padding)
    (g_ref,) = torch.autograd.grad(loss_ref, xr)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-10, atol=0)
    torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-12 * g_ref.abs().max().item())
    rows = ops.similarity_graph(x, pos, 9, 5, 0.01, padding)
    torch.testing.assert_close(rows, reference.similarity_graph(x, pos, 9, 5, 0.01, padding), rtol=0, atol=1e-12)


@needs_gpu
def test_large_window_and_patch():
    """search 63 / patch 31 (tiles of 93 x 93) and a 5-channel image staged in channel groups."""
    img = _blurred_noise((1, 2, 50, 52), seed=7)
    pos = torch.tensor([[0, 0, 0], [0, 25, 26], [0, 49, 51], [0, 10, 40]])
    grad_rows = torch.randn(4, 63 * 63, generator=torch.Generator().manual_seed(8))
    rows_ref, g_ref = _cpu_graph(img, pos, 63, 31, 0.01, "image", grad_rows)
    x = _cuda(img, torch.float32).requires_grad_()
    rows = ops.similarity_graph(x, _cuda(pos), 63, 31, 0.01, "image")
    torch.testing.assert_close(rows.double().cpu(), rows_ref, rtol=0, atol=2e-5)
    (g,) = torch.autograd.grad(rows, x, _cuda(grad_rows, torch.float32))
    assert _grad_err(g, g_ref) < 2e-4

    for dtype in (torch.float32, torch.float64):
        hr = _blurred_noise((2, 5, 40, 40), seed=9)
        sr = (hr + 0.05 * _blurred_noise(hr.shape, seed=10)).clamp(0, 1)
        pos = torch.tensor([[0, 3, 4], [1, 20, 20], [1, 39, 0], [0, 30, 17]])
        loss_ref, g_ref = _cpu_loss(sr.to(dtype), hr.to(dtype), pos, 25, 9, 0.01, "image")
        x = _cuda(sr, dtype).requires_grad_()
        loss = ops.ssl_loss(x, _cuda(hr, dtype), _cuda(pos), 25, 9, 0.01, 1000.0, 1000.0, "image")
        torch.testing.assert_close(loss.double().cpu(), loss_ref, rtol=TOL[dtype]["loss"], atol=0)
        (g,) = torch.autograd.grad(loss, x)
        assert _grad_err(g, g_ref) < TOL[dtype]["grad"]


@needs_gpu
def test_noncontiguous_inputs_and_side_stream():
    hr = _photo(2, 40, seed=11)
    sr = _degrade(hr)
    pos = _positions(hr, limit=50)
    loss_ref, g_ref = _cpu_loss(sr.float(), hr.float(), pos, 9, 5, 0.01, "image")
    x = _cuda(sr, torch.float32).to(memory_format=torch.channels_last).requires_grad_()
    t = _cuda(hr, torch.float32).transpose(2, 3).contiguous().transpose(2, 3)  # strided view with the same values
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        loss = ops.ssl_loss(x, t, _cuda(pos), 9, 5, 0.01, 1000.0, 1000.0, "image")
        (g,) = torch.autograd.grad(loss, x)
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(loss.double().cpu(), loss_ref, rtol=1e-4, atol=0)
    assert g.is_contiguous() and _grad_err(g, g_ref) < 2e-4


# --- autograd -----------------------------------------------------------------------------------------------------


@needs_gpu
@pytest.mark.parametrize("padding", ["image", "window"])
def test_gradcheck(padding):
    img = _cuda(_blurred_noise((1, 2, 20, 20), seed=12))
    target = _cuda(_blurred_noise((1, 2, 20, 20), seed=13))
    pos = _cuda(torch.tensor([[0, 0, 0], [0, 5, 7], [0, 10, 10], [0, 19, 3], [0, 12, 19], [0, 5, 7]]))
    x = img.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v: ops.similarity_graph(v, pos, 5, 3, 0.5, padding), (x,), nondet_tol=1e-10, fast_mode=True
    )
    assert torch.autograd.gradcheck(
        lambda v: ops.ssl_loss(v, target, pos, 5, 3, 0.5, 2.0, 3.0, padding), (x,), nondet_tol=1e-10
    )


@needs_gpu
def test_opcheck():
    img = _cuda(_blurred_noise((2, 3, 16, 16), seed=14)).float()
    target = _cuda(_blurred_noise((2, 3, 16, 16), seed=15)).float()
    pos = _cuda(torch.tensor([[0, 1, 2], [1, 8, 8], [1, 15, 0], [0, 9, 3]]))
    torch.library.opcheck(
        torch.ops.metaf2n.similarity_graph.default, (img.clone().requires_grad_(), pos, 5, 3, 0.05, "image")
    )
    torch.library.opcheck(
        torch.ops.metaf2n.ssl_loss.default,
        (img.clone().requires_grad_(), target, pos, 5, 3, 0.05, 1000.0, 1000.0, "window"),
    )
    if _has_op("ssl_loss_with_grad"):
        torch.library.opcheck(
            torch.ops.metaf2n.ssl_loss_with_grad.default,
            (img.clone().requires_grad_(), target, pos, 5, 3, 0.05, 1000.0, 1000.0, "image"),
            test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
        )


@needs_gpu
def test_deterministic_backward_is_bitwise_reproducible():
    hr = _photo(3, 64, seed=16)
    sr = _degrade(hr)
    pos = _cuda(torch.cat([_positions(hr, limit=300), torch.tensor([[1, 30, 30], [1, 30, 30]])]))  # duplicates
    for dtype in (torch.float32, torch.float16):
        x = _cuda(sr, dtype).requires_grad_()
        t = _cuda(hr, dtype)
        grad_rows = torch.randn(pos.shape[0], 121, device="cuda", dtype=dtype)
        fast_loss = torch.autograd.grad(ops.ssl_loss(x, t, pos, 11, 5, 0.01, 1000.0, 1000.0, "image"), x)[0]
        fast_graph = torch.autograd.grad(ops.similarity_graph(x, pos, 11, 5, 0.01, "window"), x, grad_rows)[0]
        torch.use_deterministic_algorithms(True)
        try:
            runs = []
            for _ in range(2):
                g1 = torch.autograd.grad(ops.ssl_loss(x, t, pos, 11, 5, 0.01, 1000.0, 1000.0, "image"), x)[0]
                g2 = torch.autograd.grad(ops.similarity_graph(x, pos, 11, 5, 0.01, "window"), x, grad_rows)[0]
                runs.append((g1, g2))
        finally:
            torch.use_deterministic_algorithms(False)
        assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
        tol = 2e-4 if dtype == torch.float32 else 4e-3
        assert _grad_err(runs[0][0], fast_loss.double().cpu()) < tol
        assert _grad_err(runs[0][1], fast_graph.double().cpu()) < tol


# --- batches and edge cases ---------------------------------------------------------------------------------------


@needs_gpu
def test_large_batch_with_an_empty_mask():
    hr = _cuda(_photo(16, 256, seed=17), torch.float32)
    sr = _degrade(hr)
    mask = ssl.edge_mask(hr)
    mask[5] = False
    pos = ssl.mask_positions(mask, hr)
    x = sr.clone().requires_grad_()
    loss = ops.ssl_loss(x, hr, pos, 25, 9, 0.004, 1000.0, 1000.0, "image")
    (g,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    assert g[5].abs().max().item() == 0
    assert g[4].abs().max().item() > 0
    # the batched loss is the row-weighted mean of per-image losses
    counts = mask.flatten(1).sum(1)
    parts = []
    for b in (0, 4, 9):
        pb = ssl.mask_positions(mask[b : b + 1], hr[b : b + 1])
        parts.append(ops.ssl_loss(sr[b : b + 1], hr[b : b + 1], pb, 25, 9, 0.004, 1000.0, 1000.0, "image"))
    sub = torch.cat([pos[pos[:, 0] == b] for b in (0, 4, 9)])
    sub_loss = ops.ssl_loss(sr, hr, sub, 25, 9, 0.004, 1000.0, 1000.0, "image")
    expected = sum(p * counts[b] for p, b in zip(parts, (0, 4, 9))) / counts[[0, 4, 9]].sum()
    torch.testing.assert_close(sub_loss, expected, rtol=1e-5, atol=0)
    # a subset of rows against the CPU op
    few = pos[torch.randperm(pos.shape[0], device="cuda", generator=torch.Generator("cuda").manual_seed(0))[:64]]
    loss_ref, _ = _cpu_loss(sr, hr, few, 25, 9, 0.004, "image")
    torch.testing.assert_close(
        ops.ssl_loss(sr, hr, few, 25, 9, 0.004, 1000.0, 1000.0, "image").double().cpu(), loss_ref, rtol=1e-4, atol=0
    )


@needs_gpu
def test_empty_positions():
    x = _cuda(_blurred_noise((2, 3, 16, 16), seed=18)).float().requires_grad_()
    pos = torch.zeros(0, 3, dtype=torch.long, device="cuda")
    rows = ops.similarity_graph(x, pos, 5, 3, 0.01, "image")
    assert rows.shape == (0, 25)
    loss = ops.ssl_loss(x, x.detach(), pos, 5, 3, 0.01, 1000.0, 1000.0, "image")
    assert loss.item() == 0
    (g,) = torch.autograd.grad(loss, x)
    assert g.abs().max().item() == 0


@needs_gpu
def test_out_of_range_positions_give_nan():
    hr = _cuda(_blurred_noise((2, 3, 24, 24), seed=19)).float()
    sr = (hr * 0.9).requires_grad_()
    good = torch.tensor([[0, 5, 5], [1, 12, 20]], device="cuda")
    bad = torch.tensor([[2, 5, 5], [0, -1, 3], [1, 3, 24], [-1, 0, 0]], device="cuda")
    pos = torch.cat([good[:1], bad, good[1:]])
    rows = ops.similarity_graph(sr, pos, 7, 3, 0.01, "image")
    torch.cuda.synchronize()
    assert torch.isnan(rows[1:5]).all()
    torch.testing.assert_close(rows[[0, 5]], ops.similarity_graph(sr, good, 7, 3, 0.01, "image"))
    (g,) = torch.autograd.grad(rows, sr, torch.randn_like(rows))  # out-of-range rows contribute no gradient
    assert torch.isfinite(g).all()
    for fn in (torch.ops.metaf2n.ssl_loss, ops.ssl_loss):
        loss = fn(sr, hr, pos, 7, 3, 0.01, 1000.0, 1000.0, "window")
        assert torch.isnan(loss)
        (g,) = torch.autograd.grad(loss, sr)
        torch.cuda.synchronize()
        assert torch.isfinite(g).all()


# --- shared-memory budget, opt-in, NaN and empty-batch fixes --------------------------------------------------------


def test_shared_memory_plan_counts_the_static_part():
    """Runs without a GPU: the launch plan budgets dynamic + static shared memory against the opt-in limit."""
    if not _HAS_KERNELS:
        pytest.skip("this build of metaf2n has no CUDA kernels")
    plan = torch.ops.metaf2n._cuda_shared_memory_plan
    # float64, search 21, patch 17, loss backward: 49,088 dynamic bytes, 64 under a 48 KiB limit ...
    dynamic, static, _ = plan(3, 21, 17, "image", 3, True, 8, 0, 48 * 1024)
    assert (dynamic, static) == (49088, 0)
    # ... which 80 static bytes push over it: refused with a message, not a failed launch
    with pytest.raises(ValueError, match="80 of them static"):
        plan(3, 21, 17, "image", 3, True, 8, 80, 48 * 1024)
    dynamic, static, _ = plan(3, 21, 17, "image", 3, True, 8, 80, 232448)  # an H100/H200's opt-in limit
    assert dynamic + static <= 232448
    for args in [(4, 13, 21, "image", 0, True, 4), (6, 21, 7, "image", 2, True, 4)]:
        dynamic, _, groups = plan(*args, 0, 232448)
        assert 49072 < dynamic <= 49152 and groups >= 1
    with pytest.raises(ValueError, match="mode"):
        plan(3, 5, 3, "image", 7, True, 4, 0, 49152)


NEAR_48K = [  # (dtype, channels, search, patch): dynamic shared memory in (49,072, 49,152] bytes
    (torch.float64, 3, 21, 17),
    (torch.float32, 4, 13, 21),
    (torch.float32, 6, 21, 7),
]


@needs_gpu
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("setting", NEAR_48K, ids=lambda s: f"{s[0]}-C{s[1]}-s{s[2]}p{s[3]}")
def test_launches_whose_shared_memory_ends_next_to_48k(setting, deterministic):
    dtype, channels, search, patch = setting
    hr = _blurred_noise((1, channels, 40, 40), seed=21)
    sr = (hr * 0.8 + 0.1).clamp(0, 1)
    pos = torch.tensor([[0, 20, 20], [0, 3, 35], [0, 39, 0]])
    loss_ref, grad_ref = _cpu_loss(sr, hr, pos, search, patch, 0.01, "image")
    rows_ref, graph_grad_ref = _cpu_graph(sr, pos, search, patch, 0.01, "image", torch.ones(3, search * search))
    torch.use_deterministic_algorithms(deterministic)
    try:
        x = _cuda(sr, dtype).requires_grad_()
        loss = ops.ssl_loss(x, _cuda(hr, dtype), _cuda(pos), search, patch, 0.01, 1000.0, 1000.0, "image")
        (grad,) = torch.autograd.grad(loss, x)
        rows = ops.similarity_graph(x, _cuda(pos), search, patch, 0.01, "image")
        (graph_grad,) = torch.autograd.grad(rows.sum(), x)
    finally:
        torch.use_deterministic_algorithms(False)
    tol = TOL[dtype]
    torch.testing.assert_close(loss.double().cpu(), loss_ref, rtol=tol["loss"], atol=0)
    assert _grad_err(grad, grad_ref) < tol["grad"]
    torch.testing.assert_close(rows.double().cpu(), rows_ref, atol=tol["rows"], rtol=0)
    assert _grad_err(graph_grad, graph_grad_ref) < tol["grad"]


@needs_gpu
def test_concurrent_host_threads_launch_different_sizes():
    from concurrent.futures import ThreadPoolExecutor

    settings = [(3, 5, 3), (3, 21, 17), (4, 13, 21), (6, 21, 7), (3, 25, 9)] * 4
    hr = {c: _blurred_noise((1, c, 40, 40), seed=22 + c) for c in (3, 4, 6)}
    pos = _cuda(torch.tensor([[0, 20, 20], [0, 5, 30]]))

    def run(setting):
        channels, search, patch = setting
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            x = _cuda(hr[channels] * 0.9, torch.float32).requires_grad_()
            loss = ops.ssl_loss(x, _cuda(hr[channels], torch.float32), pos, search, patch, 0.01, 1000.0, 1000.0,
                                "image")
            (g,) = torch.autograd.grad(loss, x)
        stream.synchronize()
        return loss.item(), g.cpu()

    serial = [run(s) for s in settings]
    with ThreadPoolExecutor(max_workers=8) as pool:
        parallel = list(pool.map(run, settings))
    for (l1, g1), (l2, g2) in zip(serial, parallel):
        assert l1 == pytest.approx(l2, rel=1e-6) and torch.allclose(g1, g2, rtol=1e-5, atol=1e-7)


@needs_gpu
@pytest.mark.parametrize("deterministic", [False, True])
def test_nan_in_hr_gives_a_nan_gradient_as_on_the_cpu(deterministic):
    hr = _blurred_noise((1, 3, 32, 32), seed=23)
    sr = (hr * 0.9).clamp(0, 1)
    hr[0, 1, 16, 17] = float("nan")
    pos = torch.tensor([[0, 16, 16], [0, 4, 28]])
    _, grad_cpu = _cpu_loss(sr, hr, pos, 7, 3, 0.01, "image")
    assert torch.isnan(grad_cpu).any()
    torch.use_deterministic_algorithms(deterministic)
    try:
        x = _cuda(sr, torch.float32).requires_grad_()
        loss = ops.ssl_loss(x, _cuda(hr, torch.float32), _cuda(pos), 7, 3, 0.01, 1000.0, 1000.0, "image")
        (grad,) = torch.autograd.grad(loss, x)
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.isnan(loss)
    assert torch.isnan(grad).any()  # CUDA's max(NaN, 1e-10) used to return 1e-10 and a finite gradient


@needs_gpu
def test_deterministic_backward_of_an_empty_batch_with_rows():
    x = torch.zeros(0, 3, 32, 32, device="cuda", requires_grad=True)
    pos = _cuda(torch.tensor([[0, 5, 5]]))  # out of range: there is no image 0
    torch.use_deterministic_algorithms(True)
    try:
        (g_loss,) = torch.autograd.grad(ops.ssl_loss(x, x.detach(), pos, 7, 3, 0.01, 1000.0, 1000.0, "image"), x)
        rows = ops.similarity_graph(x, pos, 7, 3, 0.01, "image")
        (g_graph,) = torch.autograd.grad(rows, x, torch.ones_like(rows))
        torch.cuda.synchronize()
    finally:
        torch.use_deterministic_algorithms(False)
    assert g_loss.shape == g_graph.shape == (0, 3, 32, 32)


@needs_gpu
def test_auto_runs_the_direct_kernels_on_cuda():
    """"auto" (the default) takes the direct kernels on CUDA whatever the mask density: no crossover has been
    measured on a GPU yet."""
    g = torch.Generator().manual_seed(0)
    sr = torch.rand(2, 3, 40, 40, generator=g).cuda()
    hr = torch.rand(2, 3, 40, 40, generator=g).cuda()
    full = torch.nonzero(torch.ones(2, 40, 40, dtype=torch.bool, device="cuda"))
    assert torch.ops.metaf2n._auto_path(hr, full, 7, 3, "image") == "direct"
    assert torch.equal(ops.ssl_loss(sr, hr, full, 7, 3, 0.01), ops.ssl_loss(sr, hr, full, 7, 3, 0.01, path="direct"))


DENSE_CONFIGS = CONFIGS + [(3, 1, 0.05, "image"), (3, 1, 0.05, "window")]


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", DENSE_CONFIGS, ids=lambda c: f"s{c[0]}p{c[1]}-{c[3]}")
def test_dense_parity(config, dtype):
    """path="dense" on CUDA against the float64 CPU op: graph rows and gradient, loss and gradient (both autograd
    routes), with duplicated rows and an image whose side is not a multiple of the 16-pixel tile."""
    search, patch, h, padding = config
    hr = torch.cat([_photo(2, 45, seed=41), _blurred_noise((1, 3, 45, 45), seed=42)])
    sr = _degrade(hr)
    pos = _positions(hr, limit=60)
    pos = torch.cat([pos, pos[:3]])
    img, sr_q = hr.to(dtype), sr.to(dtype)
    grad_rows = torch.randn(pos.shape[0], search * search, generator=torch.Generator().manual_seed(43))
    rows_ref, _ = _cpu_graph(img, pos, search, patch, h, padding, grad_rows)
    _, g_ref = _cpu_graph(img, pos, search, patch, h, padding, grad_rows.to(dtype))
    x = _cuda(img).requires_grad_()
    rows = ops.similarity_graph(x, _cuda(pos), search, patch, h, padding, path="dense")
    torch.testing.assert_close(rows.double().cpu(), rows_ref, rtol=0, atol=TOL[dtype]["rows"])
    (g,) = torch.autograd.grad(rows, x, _cuda(grad_rows, dtype))
    assert _grad_err(g, g_ref) < TOL[dtype]["grad"]
    loss_ref, lg_ref = _cpu_loss(sr_q, img, pos, search, patch, h, padding)
    for fn in (torch.ops.metaf2n.ssl_loss, ops.ssl_loss):
        x = _cuda(sr_q).requires_grad_()
        loss = fn(x, _cuda(img), _cuda(pos), search, patch, h, 1000.0, 1000.0, padding, path="dense")
        torch.testing.assert_close(loss.double().cpu(), loss_ref, rtol=TOL[dtype]["loss"], atol=0)
        (g,) = torch.autograd.grad(loss, x)
        assert _grad_err(g, lg_ref) < TOL[dtype]["grad"]


@needs_gpu
def test_dense_is_deterministic_and_matches_direct_at_16x256():
    """The training-size batch: dense equals direct to float32 rounding, and two dense runs are bitwise equal."""
    hr = _cuda(_photo(16, 256, seed=44), torch.float32)
    sr = _degrade(hr)
    pos = ssl.mask_positions(ssl.edge_mask(hr), hr)
    runs = []
    for path in ("dense", "dense", "direct"):
        x = sr.clone().requires_grad_()
        loss = ops.ssl_loss(x, hr, pos, 25, 9, 0.004, 1000.0, 1000.0, "image", path=path)
        runs.append((loss.detach(), torch.autograd.grad(loss, x)[0]))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    torch.testing.assert_close(runs[0][0], runs[2][0], rtol=1e-5, atol=0)
    assert _grad_err(runs[0][1], runs[2][1].double().cpu()) < 2e-4
