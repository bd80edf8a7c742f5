"""The CUDA kernels (csrc/cuda/ssg_kernel.cu), host code included, run on the CPU emulator of csrc/cuda_emu/.

No GPU has run these kernels in CI: here the same source, compiled as C++ against an emulator that runs every CUDA
thread as a fiber (barriers and warp shuffles wait for every live thread; shared memory starts as NaN bytes; launch
limits as on a GPU), is compared with the CPU ops, which are themselves checked against the plain-PyTorch oracle.
Each check runs with the threads of a block in forward and in reverse order between barriers, so a missing barrier
gives a wrong answer in one of the two.

What this cannot check: speed, and anything that depends on real warp timing. tests/test_cuda.py does that on a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from metaf2n import ops, ssl

try:
    import metaf2n._C_cuda_emu  # noqa: F401  (registers torch.ops.metaf2n_cuda_emu.*)
except ImportError:
    if os.environ.get("METAF2N_CUDA_EMULATION", "").upper() == "ON":
        raise  # scripts/test.sh builds the emulator: a missing module there is a broken build, not a skip
    pytest.skip("metaf2n was built without METAF2N_CUDA_EMULATION=ON", allow_module_level=True)

EMU = torch.ops.metaf2n_cuda_emu
ORDERS = ("forward", "reverse")

# Against the float64 CPU op on the same input values (as in test_cuda.py): rows absolute, loss relative, gradients
# absolute relative to the largest entry.
TOL = {
    torch.float64: {"rows": 1e-12, "loss": 1e-11, "grad": 1e-11},
    torch.float32: {"rows": 2e-5, "loss": 1e-4, "grad": 2e-4},
    torch.float16: {"rows": 2e-3, "loss": 2e-3, "grad": 4e-3},
    torch.bfloat16: {"rows": 1.6e-2, "loss": 1.6e-2, "grad": 1.6e-2},
}

CONFIGS = [  # (search, patch, h, padding)
    (
        25,
        9,
        0.004,
        "image",
    ),  # the defaults: 160 threads, 3 register blocks per offset row
    (25, 9, 0.004, "window"),
    (7, 5, 0.01, "image"),
    (11, 3, 0.02, "window"),
    (
        5,
        7,
        0.05,
        "window",
    ),  # patch radius > search radius: query pixels outside the window read 0
    (15, 13, 0.01, "image"),  # partial register blocks
    (3, 1, 0.05, "image"),
]


@pytest.fixture(params=ORDERS)
def order(request, monkeypatch):
    monkeypatch.setenv("METAF2N_CUDA_EMU_ORDER", request.param)
    return request.param


@pytest.fixture(params=[False, True], ids=["atomic", "deterministic"])
def deterministic(request):
    torch.use_deterministic_algorithms(request.param)
    yield request.param
    torch.use_deterministic_algorithms(False)


def _photo(batch: int, size: int, channels: int = 3, seed: int = 0) -> torch.Tensor:
    """Crops (batch, channels, size, size) in [0, 1] of the skimage astronaut photo at seeded offsets, float64."""
    data = pytest.importorskip("skimage.data")
    img = torch.from_numpy(np.ascontiguousarray(data.astronaut())).permute(2, 0, 1).double() / 255
    img = torch.cat([img, img.flip(0), 1 - img])[:channels]
    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(batch):
        y, x = (
            rng.integers(0, img.shape[1] - size + 1),
            rng.integers(0, img.shape[2] - size + 1),
        )
        crops.append(img[:, y : y + size, x : x + size])
    return torch.stack(crops).contiguous()


def _rows_subset(hr: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """`count` edge-mask positions of hr, uneven across the batch, plus the corners (the borders' reflections)."""
    pos = ssl.mask_positions(ssl.edge_mask(hr[:, :3], threshold=5.0), hr)
    keep = torch.randperm(pos.shape[0], generator=torch.Generator().manual_seed(seed))[:count]
    h, w = hr.shape[-2:]
    corners = torch.tensor([[0, 0, 0], [hr.shape[0] - 1, h - 1, w - 1], [0, h - 1, 0]])
    return torch.cat([pos[keep.sort().values], corners])


def _cpu_graph(img, pos, search, patch, h, padding, grad_rows):
    x = img.detach().double().requires_grad_()
    rows = ops.similarity_graph(x, pos, search, patch, h, padding, path="direct")
    (g,) = torch.autograd.grad((rows * grad_rows).sum(), x)
    return rows.detach(), g


def _cpu_loss(sr, hr, pos, search, patch, h, padding, kl=1000.0, l1=1000.0):
    x = sr.detach().double().requires_grad_()
    loss = ops.ssl_loss(x, hr.double(), pos, search, patch, h, kl, l1, padding, path="direct")
    (g,) = torch.autograd.grad(loss, x)
    return loss.detach(), g


def _grad_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def _pair(size=36, batch=2, channels=3, seed=0):
    hr = _photo(batch, size, channels, seed=seed)
    sr = (0.8 * hr + 0.1 * _photo(batch, size, channels, seed=seed + 7)).clamp(0, 1)
    return sr, hr


# --- the emulator itself: what it catches, on small kernels with known defects (csrc/cuda_emu/selftest.cpp) ------


def _reduce_twice_expected(n: int) -> torch.Tensor:
    total = n * (n + 1) / 2
    return torch.tensor([total] * n + [2 * total] * n)


def test_emulator_runs_correct_kernels_exactly(order):
    t = torch.arange(64, dtype=torch.float32)
    assert torch.equal(EMU.selftest("neighbour", 64, 256, 2)[:128], torch.cat([(t + 1) % 64] * 2))
    assert torch.equal(EMU.selftest("reuse", 64, 256)[:64], (t + 32) % 64)
    assert torch.equal(EMU.selftest("lower_neighbour", 64, 256)[:64], (t - 1).clamp_min(0))
    assert torch.equal(EMU.selftest("reduce_twice", 96, 0), _reduce_twice_expected(96))
    shuffled = torch.arange(32, dtype=torch.float32).view(16, 2).flip(1).flatten()
    assert torch.equal(EMU.selftest("shuffle", 32, 0)[:32], shuffled)


def test_emulator_exposes_a_missing_barrier_in_each_order(order):
    """Without the barrier, a thread reads a slot before its writer ran (NaN: shared memory starts as NaN bytes), or
    a warp running ahead (through its shuffles) overwrites a slot another warp has not read yet."""
    t = torch.arange(64, dtype=torch.float32)
    assert not torch.equal(EMU.selftest("neighbour_race", 64, 256)[:64], (t + 1) % 64)
    assert not torch.equal(EMU.selftest("reuse_race", 64, 256)[:64], (t + 32) % 64)
    assert not torch.equal(EMU.selftest("reduce_twice_race", 96, 0), _reduce_twice_expected(96))


def test_emulator_needs_both_orders(monkeypatch):
    """A read of a lower thread's slot without a barrier looks right when threads run in forward order: the reverse
    order is what shows it."""
    expected = (torch.arange(64, dtype=torch.float32) - 1).clamp_min(0)
    monkeypatch.setenv("METAF2N_CUDA_EMU_ORDER", "forward")
    assert torch.equal(EMU.selftest("lower_neighbour_race", 64, 256)[:64], expected)
    monkeypatch.setenv("METAF2N_CUDA_EMU_ORDER", "reverse")
    assert torch.isnan(EMU.selftest("lower_neighbour_race", 64, 256)[1:64]).all()


def test_emulator_fills_shared_memory_with_nan():
    assert torch.isnan(EMU.selftest("uninitialised", 32, 128)[:32]).all()


@pytest.mark.parametrize(
    ("name", "threads", "shared_bytes", "blocks", "message"),
    [
        ("overflow", 32, 128, 1, "past the end of dynamic shared memory"),
        ("divergent", 32, 0, 1, "divergent barrier"),
        ("shuffle", 1025, 0, 1, "invalid configuration"),
        ("shuffle", 32, 0, 0, "invalid configuration"),  # a zero-block grid, as CUDA refuses it
        ("uninitialised", 32, 49073, 1, "above the kernel's limit of 49072"),  # 48 KiB - 80 static, no opt-in
    ],
)
def test_emulator_refuses_what_a_gpu_refuses_or_corrupts(name, threads, shared_bytes, blocks, message):
    with pytest.raises(RuntimeError, match=message):
        EMU.selftest(name, threads, shared_bytes, blocks)
    EMU.selftest("shuffle", 32, 0)  # and is usable afterwards


# --- parity with the CPU ops ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"s{c[0]}p{c[1]}-{c[3]}")
def test_graph_rows_and_gradient_match_the_cpu_op(config, order, deterministic):
    search, patch, h, padding = config
    _, img = _pair(seed=1)
    pos = _rows_subset(img, 8, seed=2)  # 11 rows: the last block of two has one row
    grad_rows = torch.randn(
        pos.shape[0],
        search * search,
        generator=torch.Generator().manual_seed(3),
        dtype=img.dtype,
    )
    rows_ref, grad_ref = _cpu_graph(img, pos, search, patch, h, padding, grad_rows)
    rows = EMU.graph_forward(img, pos, search, patch, h, padding)
    grad = EMU.graph_backward(grad_rows, rows, img, pos, search, patch, h, padding)
    torch.testing.assert_close(rows, rows_ref, atol=TOL[torch.float64]["rows"], rtol=0)
    assert _grad_err(grad, grad_ref) < TOL[torch.float64]["grad"]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"s{c[0]}p{c[1]}-{c[3]}")
def test_loss_and_gradient_match_the_cpu_op(config, order, deterministic):
    search, patch, h, padding = config
    sr, hr = _pair(seed=4)
    pos = _rows_subset(hr, 7, seed=5)
    loss_ref, grad_ref = _cpu_loss(sr, hr, pos, search, patch, h, padding, kl=700.0, l1=1300.0)
    loss = EMU.loss_forward(sr, hr, pos, search, patch, h, 700.0, 1300.0, padding)
    grad = EMU.loss_backward(
        torch.tensor(0.37, dtype=sr.dtype),
        sr,
        hr,
        pos,
        search,
        patch,
        h,
        700.0,
        1300.0,
        padding,
    )
    fused_loss, fused_grad = EMU.loss_with_grad(sr, hr, pos, search, patch, h, 700.0, 1300.0, padding)
    tol = TOL[torch.float64]
    torch.testing.assert_close(loss, loss_ref, rtol=tol["loss"], atol=0)
    torch.testing.assert_close(fused_loss, loss_ref, rtol=tol["loss"], atol=0)
    assert _grad_err(grad, 0.37 * grad_ref) < tol["grad"]
    assert _grad_err(fused_grad, grad_ref) < tol["grad"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_reduced_precision_inputs_accumulate_in_float32(dtype, deterministic):
    sr, hr = _pair(seed=6)
    sr, hr = (
        sr.to(dtype),
        hr.to(dtype),
    )  # the CPU reference reads the same quantised values in float64
    pos = _rows_subset(hr.double(), 6, seed=7)
    loss_ref, grad_ref = _cpu_loss(sr, hr, pos, 25, 9, 0.004, "image")
    rows_ref, _ = _cpu_graph(
        hr,
        pos,
        25,
        9,
        0.004,
        "image",
        torch.zeros(pos.shape[0], 625, dtype=torch.float64),
    )
    loss, grad = EMU.loss_with_grad(sr, hr, pos, 25, 9, 0.004, 1000.0, 1000.0, "image")
    rows = EMU.graph_forward(hr, pos, 25, 9, 0.004, "image")
    tol = TOL[dtype]
    assert loss.dtype == grad.dtype == rows.dtype == dtype
    torch.testing.assert_close(loss.double(), loss_ref, rtol=tol["loss"], atol=0)
    assert _grad_err(grad, grad_ref) < tol["grad"]
    torch.testing.assert_close(rows.double(), rows_ref, atol=tol["rows"], rtol=0)


def test_channel_groups_staged_one_after_another(order, deterministic):
    """Five float64 channels do not fit the 64 KiB a block aims for: the kernels stage them in groups."""
    *_, groups = EMU.shared_memory_plan(5, 25, 9, "image", 3, True, 8, 80, 232448)
    assert groups < 5
    sr, hr = _pair(size=40, channels=5, seed=8)
    pos = _rows_subset(hr, 5, seed=9)
    loss_ref, grad_ref = _cpu_loss(sr, hr, pos, 25, 9, 0.004, "image")
    loss, grad = EMU.loss_with_grad(sr, hr, pos, 25, 9, 0.004, 1000.0, 1000.0, "image")
    torch.testing.assert_close(loss, loss_ref, rtol=1e-11, atol=0)
    assert _grad_err(grad, grad_ref) < 1e-11
    grad_rows = torch.randn(
        pos.shape[0],
        625,
        generator=torch.Generator().manual_seed(17),
        dtype=torch.float64,
    )
    rows_ref, graph_grad_ref = _cpu_graph(hr, pos, 25, 9, 0.004, "image", grad_rows)
    rows = EMU.graph_forward(hr, pos, 25, 9, 0.004, "image")
    torch.testing.assert_close(rows, rows_ref, atol=1e-12, rtol=0)
    assert (
        _grad_err(
            EMU.graph_backward(grad_rows, rows, hr, pos, 25, 9, 0.004, "image"),
            graph_grad_ref,
        )
        < 1e-11
    )


def test_deterministic_backward_is_bitwise_independent_of_the_thread_order(monkeypatch):
    sr, hr = _pair(seed=10)
    pos = _rows_subset(hr, 12, seed=11)
    pos = torch.cat([pos, pos[:4]])  # repeated rows share a pixel: their order is fixed by a stable sort
    results = []
    torch.use_deterministic_algorithms(True)
    try:
        for order in ORDERS:
            monkeypatch.setenv("METAF2N_CUDA_EMU_ORDER", order)
            rows = EMU.graph_forward(hr, pos, 7, 5, 0.01, "image")
            grad_rows = torch.randn(
                rows.shape,
                generator=torch.Generator().manual_seed(18),
                dtype=rows.dtype,
            )
            results.append(
                (
                    EMU.loss_with_grad(sr, hr, pos, 7, 5, 0.01, 1000.0, 1000.0, "image")[1],
                    EMU.graph_backward(grad_rows, rows, hr, pos, 7, 5, 0.01, "image"),
                )
            )
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


# --- the four fixes of issue 9, part 0 ------------------------------------------------------------------------------

NEAR_48K = [  # (dtype, channels, search, patch): dynamic shared memory in (49,072, 49,152] bytes
    (torch.float64, 3, 21, 17),
    (torch.float32, 4, 13, 21),
    (torch.float32, 6, 21, 7),
]


@pytest.mark.parametrize("setting", NEAR_48K, ids=lambda s: f"{s[0]}-C{s[1]}-s{s[2]}p{s[3]}")
def test_launches_whose_shared_memory_ends_next_to_48k(setting, deterministic):
    """These launches need the opt-in above 48 KiB only once the 80 static bytes are counted."""
    dtype, channels, search, patch = setting
    sr, hr = _pair(size=40, channels=channels, seed=12)
    sr, hr = sr.to(dtype), hr.to(dtype)
    pos = torch.tensor([[0, 20, 20], [1, 3, 35], [0, 39, 0]])
    loss_ref, grad_ref = _cpu_loss(sr, hr, pos, search, patch, 0.01, "image")
    loss, grad = EMU.loss_with_grad(sr, hr, pos, search, patch, 0.01, 1000.0, 1000.0, "image")
    tol = TOL[dtype]
    torch.testing.assert_close(loss.double(), loss_ref, rtol=tol["loss"], atol=0)
    assert _grad_err(grad, grad_ref) < tol["grad"]


def test_shared_memory_limits_are_enforced_with_the_static_part_counted():
    """With the opt-in limit of a 48 KiB device, a launch that fits only without its static bytes is refused by the
    plan with a ValueError (not a failed launch); without static bytes it runs. Fresh processes: the limits are read
    once per process."""
    script = textwrap.dedent(
        """
        import torch, metaf2n._C_cuda_emu
        x = torch.rand(1, 3, 40, 40, dtype=torch.float64)
        pos = torch.tensor([[0, 20, 20]])
        try:
            loss, grad = torch.ops.metaf2n_cuda_emu.loss_with_grad(x, x * 0.9, pos, 21, 17, 0.01, 1.0, 1.0, "image")
            print("ran", bool(torch.isfinite(grad).all()))
        except ValueError as e:
            print("refused", "80 of them static" in str(e))
        """
    )
    outcomes = {}
    for static in ("80", "0"):
        env = dict(os.environ, METAF2N_CUDA_EMU_OPTIN="49152", METAF2N_CUDA_EMU_STATIC=static)
        done = subprocess.run(
            [sys.executable, "-c", script],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        outcomes[static] = done.stdout.strip()
    assert outcomes == {"80": "refused True", "0": "ran True"}


@pytest.mark.parametrize("deterministic_", [False, True], ids=["atomic", "deterministic"])
def test_nan_in_hr_gives_a_nan_gradient_as_on_the_cpu(deterministic_):
    sr, hr = _pair(size=32, batch=1, seed=13)
    hr[0, 1, 16, 17] = float("nan")
    pos = torch.tensor([[0, 16, 16], [0, 4, 28]])
    _, grad_cpu = _cpu_loss(sr, hr, pos, 7, 3, 0.01, "image")
    torch.use_deterministic_algorithms(deterministic_)
    try:
        loss, grad = EMU.loss_with_grad(sr.float(), hr.float(), pos, 7, 3, 0.01, 1000.0, 1000.0, "image")
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.isnan(loss)
    # the same pixels are NaN as on the CPU (CUDA's max(NaN, 1e-10) used to return 1e-10 and a finite gradient)
    assert torch.isnan(grad_cpu).any()
    assert torch.equal(torch.isnan(grad), torch.isnan(grad_cpu))


def test_deterministic_backward_of_an_empty_batch_with_rows():
    x = torch.zeros(0, 3, 32, 32)
    pos = torch.tensor([[0, 5, 5]])  # out of range: there is no image 0
    torch.use_deterministic_algorithms(True)
    try:
        loss, g_loss = EMU.loss_with_grad(x, x, pos, 7, 3, 0.01, 1000.0, 1000.0, "image")
        rows = EMU.graph_forward(x, pos, 7, 3, 0.01, "image")
        g_graph = EMU.graph_backward(torch.ones_like(rows), rows, x, pos, 7, 3, 0.01, "image")
    finally:
        torch.use_deterministic_algorithms(False)
    assert g_loss.shape == g_graph.shape == (0, 3, 32, 32)
    assert torch.isnan(loss) and torch.isnan(rows).all()


# --- CUDA-only behaviour: unchecked positions -----------------------------------------------------------------------


def test_out_of_range_rows_read_nothing_and_give_nan(deterministic):
    """Positions are not range-checked on the device: such a row's graph row and loss term are NaN and it adds no
    gradient, while the other rows are exact."""
    sr, hr = _pair(size=32, seed=14)
    good = torch.tensor([[0, 16, 16], [1, 2, 30]])
    bad = torch.tensor([[2, 5, 5], [0, -1, 4], [1, 7, 32]])
    pos = torch.cat([good[:1], bad, good[1:]])
    grad_rows = torch.randn(5, 49, generator=torch.Generator().manual_seed(16), dtype=torch.float64)
    rows = EMU.graph_forward(hr, pos, 7, 3, 0.01, "image")
    rows_ref, grad_ref = _cpu_graph(hr, good, 7, 3, 0.01, "image", grad_rows[[0, 4]])
    assert torch.isnan(rows[1:4]).all()
    torch.testing.assert_close(rows[[0, 4]], rows_ref, atol=1e-12, rtol=0)
    grad = EMU.graph_backward(grad_rows, rows, hr, pos, 7, 3, 0.01, "image")
    assert _grad_err(grad, grad_ref) < 1e-11
    assert torch.isnan(EMU.loss_forward(sr, hr, pos, 7, 3, 0.01, 1000.0, 1000.0, "image"))


def test_empty_positions():
    sr, hr = _pair(size=24, seed=15)
    none = torch.zeros(0, 3, dtype=torch.int64)
    assert EMU.graph_forward(hr, none, 7, 3, 0.01, "image").shape == (0, 49)
    loss, grad = EMU.loss_with_grad(sr, hr, none, 7, 3, 0.01, 1000.0, 1000.0, "image")
    assert loss.item() == 0 and torch.equal(grad, torch.zeros_like(sr))


# --- the dense path's CUDA kernels -------------------------------------------------------------------------------

DENSE_CONFIGS = [  # (search, patch, h, padding)
    (25, 9, 0.004, "image"),  # the defaults
    (25, 9, 0.004, "window"),
    (7, 5, 0.01, "image"),
    (11, 5, 0.01, "window"),
    (5, 7, 0.05, "image"),  # patch radius > search radius
    (5, 7, 0.05, "window"),  # ... where query pixels outside the window read 0
    (3, 1, 0.05, "image"),
    (3, 1, 0.05, "window"),
    (11, 13, 0.01, "image"),  # a patch nearly as large as the tile
]


def _dense_rows(hr: torch.Tensor, seed: int) -> torch.Tensor:
    """Edge rows plus the corners and two repeated rows (rows at one pixel share a line of distances)."""
    pos = _rows_subset(hr, 9, seed=seed)
    return torch.cat([pos, pos[2:4]])


@pytest.mark.parametrize("config", DENSE_CONFIGS, ids=lambda c: f"s{c[0]}p{c[1]}-{c[3]}")
def test_dense_graph_matches_the_cpu_op(config, order):
    search, patch, h, padding = config
    # 37: tiles of 16 that end past the image; the defaults on one small image, for time
    size, batch = (26, 1) if search == 25 else (37, 2)
    _, img = _pair(size=size, batch=batch, seed=19)
    pos = _dense_rows(img, seed=20)
    grad_rows = torch.randn(pos.shape[0], search * search, generator=torch.Generator().manual_seed(21), dtype=img.dtype)
    rows_ref, grad_ref = _cpu_graph(img, pos, search, patch, h, padding, grad_rows)
    rows = EMU.graph_forward(img, pos, search, patch, h, padding, True)
    grad = EMU.graph_backward(grad_rows, rows, img, pos, search, patch, h, padding, True)
    torch.testing.assert_close(rows, rows_ref, atol=1e-12, rtol=0)
    assert _grad_err(grad, grad_ref) < 1e-11


@pytest.mark.parametrize("config", DENSE_CONFIGS, ids=lambda c: f"s{c[0]}p{c[1]}-{c[3]}")
def test_dense_loss_matches_the_cpu_op(config, order):
    search, patch, h, padding = config
    size, batch = (26, 1) if search == 25 else (37, 2)
    sr, hr = _pair(size=size, batch=batch, seed=22)
    pos = _dense_rows(hr, seed=23)
    loss_ref, grad_ref = _cpu_loss(sr, hr, pos, search, patch, h, padding, kl=700.0, l1=1300.0)
    loss = EMU.loss_forward(sr, hr, pos, search, patch, h, 700.0, 1300.0, padding, True)
    grad = EMU.loss_backward(
        torch.tensor(0.37, dtype=sr.dtype), sr, hr, pos, search, patch, h, 700.0, 1300.0, padding, True
    )
    fused_loss, fused_grad = EMU.loss_with_grad(sr, hr, pos, search, patch, h, 700.0, 1300.0, padding, True)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-11, atol=0)
    torch.testing.assert_close(fused_loss, loss_ref, rtol=1e-11, atol=0)
    assert _grad_err(grad, 0.37 * grad_ref) < 1e-11
    assert _grad_err(fused_grad, grad_ref) < 1e-11


@pytest.mark.parametrize("padding", ["image", "window"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_dense_reduced_precision_inputs(dtype, padding):
    sr, hr = _pair(size=26, seed=24)
    sr, hr = sr.to(dtype), hr.to(dtype)
    pos = _dense_rows(hr.double(), seed=25)
    loss_ref, grad_ref = _cpu_loss(sr, hr, pos, 13, 9, 0.004, padding)
    rows_ref, _ = _cpu_graph(hr, pos, 13, 9, 0.004, padding, torch.zeros(pos.shape[0], 169, dtype=torch.float64))
    loss, grad = EMU.loss_with_grad(sr, hr, pos, 13, 9, 0.004, 1000.0, 1000.0, padding, True)
    rows = EMU.graph_forward(hr, pos, 13, 9, 0.004, padding, True)
    tol = TOL[dtype]
    assert loss.dtype == grad.dtype == rows.dtype == dtype
    torch.testing.assert_close(loss.double(), loss_ref, rtol=tol["loss"], atol=0)
    assert _grad_err(grad, grad_ref) < tol["grad"]
    torch.testing.assert_close(rows.double(), rows_ref, atol=tol["rows"], rtol=0)


@pytest.mark.parametrize("padding", ["image", "window"])
def test_dense_many_channels_and_a_full_mask(order, padding):
    """Five channels, every pixel a row (tiles full of rows, every padded pixel with a gradient)."""
    sr, hr = _pair(size=18, batch=1, channels=5, seed=26)
    pos = torch.nonzero(torch.ones(1, 18, 18, dtype=torch.bool))
    loss_ref, grad_ref = _cpu_loss(sr, hr, pos, 5, 3, 0.01, padding)
    loss, grad = EMU.loss_with_grad(sr, hr, pos, 5, 3, 0.01, 1000.0, 1000.0, padding, True)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-11, atol=0)
    assert _grad_err(grad, grad_ref) < 1e-11


@pytest.mark.parametrize("padding", ["image", "window"])
def test_dense_is_bitwise_independent_of_the_thread_order(monkeypatch, padding):
    sr, hr = _pair(size=37, seed=27)
    pos = _dense_rows(hr, seed=28)
    results = []
    for order in ORDERS:
        monkeypatch.setenv("METAF2N_CUDA_EMU_ORDER", order)
        rows = EMU.graph_forward(hr, pos, 7, 5, 0.01, padding, True)
        grad_rows = torch.randn(rows.shape, generator=torch.Generator().manual_seed(29), dtype=rows.dtype)
        results.append(
            (
                rows,
                EMU.loss_with_grad(sr, hr, pos, 7, 5, 0.01, 1000.0, 1000.0, padding, True)[1],
                EMU.graph_backward(grad_rows, rows, hr, pos, 7, 5, 0.01, padding, True),
            )
        )
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_dense_out_of_range_rows_and_empty_inputs():
    sr, hr = _pair(size=32, seed=30)
    good = torch.tensor([[0, 16, 16], [1, 2, 30]])
    pos = torch.cat([good[:1], torch.tensor([[2, 5, 5], [0, -1, 4], [1, 7, 32]]), good[1:]])
    grad_rows = torch.randn(5, 49, generator=torch.Generator().manual_seed(31), dtype=torch.float64)
    rows = EMU.graph_forward(hr, pos, 7, 3, 0.01, "image", True)
    rows_ref, grad_ref = _cpu_graph(hr, good, 7, 3, 0.01, "image", grad_rows[[0, 4]])
    assert torch.isnan(rows[1:4]).all()
    torch.testing.assert_close(rows[[0, 4]], rows_ref, atol=1e-12, rtol=0)
    assert _grad_err(EMU.graph_backward(grad_rows, rows, hr, pos, 7, 3, 0.01, "image", True), grad_ref) < 1e-11
    assert torch.isnan(EMU.loss_forward(sr, hr, pos, 7, 3, 0.01, 1000.0, 1000.0, "image", True))
    # no image with rows (B = 0), and no rows
    x = torch.zeros(0, 3, 32, 32)
    loss, grad = EMU.loss_with_grad(x, x, torch.tensor([[0, 5, 5]]), 7, 3, 0.01, 1000.0, 1000.0, "image", True)
    assert torch.isnan(loss) and grad.shape == x.shape
    none = torch.zeros(0, 3, dtype=torch.int64)
    loss, grad = EMU.loss_with_grad(sr, hr, none, 7, 3, 0.01, 1000.0, 1000.0, "image", True)
    assert loss.item() == 0 and torch.equal(grad, torch.zeros_like(sr))
