"""Speed and memory of the SSL ops against the plain-PyTorch reference, side by side, on real photo crops.

    python bench/bench_ssl.py                       # 128^2 ... 1024^2 on the CPU (+ the CUDA section on a GPU)
    python bench/bench_ssl.py --sizes 128 --repeats 3 --out results/bench
    python bench/bench_ssl.py --sweep               # direct vs dense against mask density on the 256^2 crop

Every (size, implementation) runs in a fresh subprocess so that its peak memory (the rise of the process's peak
resident set over what the inputs already hold) is its own. Work is counted on the direct method whatever the path
(so GFLOP/s stay comparable): one "difference" is one (x_p - x_q)^2 term, sub + mul + add = 3 flops, and a graph row
has K * C * patch^2 of them; the fused loss computes 2 graphs (SR and HR) forward and counts as 4 graphs forward +
backward.

The sweep times the fused loss (forward + backward) on both paths for masks of stride 1..8 (threshold 20) and
thresholds 5..60 (stride 1), and fits the cost ratio that `path="auto"` uses (kDenseCostRatio in csrc/ssg.cpp):
auto picks dense when the direct work N C P^2 exceeds ratio x the dense work estimate, the same formula as here.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SEARCH, PATCH, H = 25, 9, 0.004
IMPLS = ("reference", "loss_direct", "loss_dense", "loss_auto", "graph_auto")
DENSE_BAND_LINES = 32  # csrc/ssg.cpp's work estimate groups lines like this (the dense kernel's band height)
REFERENCE_MEMORY_LIMIT = 16e9  # bytes; the machine has 24 GB


def crop_pair(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HR: a size x size crop of skimage's astronaut (1024: the whole 512^2 photo and its three mirror images
    tiled 2 x 2, which keeps a photo's edge density; an x2 upscale would smooth most edges away); SR: its bicubic
    x4 down-up version."""
    import skimage.data

    rgb = torch.from_numpy(np.ascontiguousarray(skimage.data.astronaut())).permute(2, 0, 1)[None].float() / 255
    if size == 1024:
        rgb = torch.cat([torch.cat([rgb, rgb.flip(3)], 3), torch.cat([rgb.flip(2), rgb.flip(2, 3)], 3)], 2)
    elif size > 512:
        raise ValueError("sizes up to 512, and 1024, are supported")
    top = {128: 180, 256: 100}.get(size, 0)
    left = {128: 200, 256: 150}.get(size, 0)
    hr = rgb[:, :, top : top + size, left : left + size].contiguous()
    small = F.interpolate(hr, scale_factor=0.25, mode="area")
    sr = F.interpolate(small, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    return sr, hr


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(size: int, impl: str, repeats: int) -> dict:
    from metaf2n import reference
    from metaf2n.ssl import edge_mask, ops

    sr, hr = crop_pair(size)
    positions = torch.nonzero(edge_mask(hr))
    n = positions.shape[0]
    weights = torch.randn(n, SEARCH * SEARCH, generator=torch.Generator().manual_seed(0))

    def forward(x):
        if impl == "reference":
            return reference.ssl_loss(x, hr, positions, SEARCH, PATCH, H)
        if impl.startswith("loss_"):
            return ops.ssl_loss(x, hr, positions, SEARCH, PATCH, H, path=impl.removeprefix("loss_"))
        return (ops.similarity_graph(x, positions, SEARCH, PATCH, H, path="auto") * weights).sum()

    def run():
        x = sr.clone().requires_grad_()
        t0 = time.perf_counter()
        forward(x).backward()
        return time.perf_counter() - t0

    def run_forward():
        with torch.no_grad():
            t0 = time.perf_counter()
            forward(sr)
            return time.perf_counter() - t0

    base = current_rss()
    first = run()  # its memory peak is the one reported
    peak = peak_rss() - base
    totals = [first] + [run() for _ in range(repeats - 1)]
    forwards = [run_forward() for _ in range(repeats)]
    return {
        "size": size,
        "impl": impl,
        "n": n,
        "forward_s": statistics.median(forwards),
        "total_s": statistics.median(totals),
        "peak_bytes": max(peak, 0),
        "threads": torch.get_num_threads(),
    }


def measure_matmul_peak() -> float:
    """Achievable fp32 GFLOP/s of this machine: the best of a few 2048^3 matmuls."""
    a = torch.randn(2048, 2048)
    b = torch.randn(2048, 2048)
    a @ b
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * 2048**3 / best / 1e9


def graph_flops(n: int, channels: int = 3) -> float:
    return 3.0 * n * SEARCH * SEARCH * channels * PATCH * PATCH


def reference_memory_estimate(n: int, channels: int = 3) -> float:
    """Bytes autograd keeps for the reference: measured 0.86 MB per row at the defaults (1.42 float32 copies of
    the K x C x patch^2 candidate differences); 1.5 copies are assumed."""
    return 1.5 * 4.0 * n * SEARCH * SEARCH * channels * PATCH * PATCH


def run_in_subprocess(size: int, impl: str, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(size), impl, "--repeats", str(repeats)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"size": size, "impl": impl, "error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def format_table(results: list[dict], peak_gflops: float) -> str:
    lines = [
        (f"SSL on the CPU ({torch.get_num_threads()} threads, torch {torch.__version__}); search {SEARCH}, patch {PATCH}, "
        f"h {H}, edge mask > 20; fp32 matmul peak measured {peak_gflops:.0f} GFLOP/s"),
        "",
        "| size | N | implementation | forward ms (no grad) | fwd+bwd ms | peak MB | speed-up vs ref | vs direct | memory vs ref | GFLOP/s fwd | GFLOP/s fwd+bwd | % of peak (fwd+bwd) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_size: dict[int, dict[str, dict]] = {}
    for r in results:
        by_size.setdefault(r["size"], {})[r["impl"]] = r
    for size, rows in sorted(by_size.items()):
        ref = rows.get("reference", {})
        for impl in IMPLS:
            r = rows.get(impl)
            if r is None:
                continue
            if "error" in r or "skipped" in r:
                lines.append(f"| {size}^2 | {r.get('n', '')} | {impl} | {r.get('skipped') or r.get('error')} | | | | | | | | |")
                continue
            graphs = 1 if impl.startswith("graph_") else 2
            work_fwd = graph_flops(r["n"]) * graphs
            fwd_gflops = work_fwd / r["forward_s"] / 1e9
            total_gflops = 2 * work_fwd / r["total_s"] / 1e9
            speedup = memory = vs_direct = ""
            if "total_s" in ref and impl != "reference":
                speedup = f"{ref['total_s'] / r['total_s']:.0f}x"
                memory = f"{100 * r['peak_bytes'] / max(ref['peak_bytes'], 1):.2f}%"
            direct = rows.get("loss_direct", {})
            if impl.startswith("loss_") and "total_s" in direct:
                vs_direct = f"{direct['total_s'] / r['total_s']:.2f}x"
            lines.append(
                f"| {size}^2 | {r['n']} | {impl} | {1e3 * r['forward_s']:.1f} | {1e3 * r['total_s']:.1f} | "
                f"{r['peak_bytes'] / 1e6:.1f} | {speedup} | {vs_direct} | {memory} | {fwd_gflops:.1f} | "
                f"{total_gflops:.1f} | {100 * total_gflops / peak_gflops:.0f}% |"
            )
    lines += [
        "",
        "loss_<path>: fused KL + L1 loss op on that path; graph_auto: graph op + weighted sum of its rows (1 graph);",
        "reference: metaf2n.reference (unfold + autograd, chunks of 256 rows). Work: 3 flops per difference of the direct",
        "method on every path, fwd+bwd = 2x fwd.",
    ]
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "total_s" in r]
    sizes = sorted({r["size"] for r in ok})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(IMPLS)
    for i, impl in enumerate(IMPLS):
        xs, ts, ms = [], [], []
        for j, size in enumerate(sizes):
            r = next((r for r in ok if r["size"] == size and r["impl"] == impl), None)
            if r:
                xs.append(j + (i - (len(IMPLS) - 1) / 2) * width)
                ts.append(r["total_s"] * 1e3)
                ms.append(max(r["peak_bytes"], 1) / 1e6)
        axes[0].bar(xs, ts, width, label=impl)
        axes[1].bar(xs, ms, width, label=impl)
    for ax, title in zip(axes, ("forward + backward time (ms, log)", "peak memory (MB, log)")):
        ax.set_yscale("log")
        ax.set_xticks(range(len(sizes)), [f"{s}^2" for s in sizes])
        ax.set_title(title)
        ax.legend()
    fig.suptitle("Self-similarity loss on the CPU: ours vs the plain-PyTorch reference")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def work_estimate(positions: torch.Tensor, shape: torch.Size, patch: int = PATCH) -> tuple[float, float]:
    """(direct, dense) work per offset, as csrc/ssg.cpp's dense_is_cheaper() estimates it: direct N C P^2; dense
    (C + 3) per pixel of the lines its bands read (lines with rows, plus P - 1 per band) and P per row."""
    _, C, H, W = shape
    b, y = positions[:, 0], positions[:, 1]
    lines = torch.unique(b * H + y).numel()
    bands = torch.unique(b * ((H + DENSE_BAND_LINES - 1) // DENSE_BAND_LINES) + y // DENSE_BAND_LINES).numel()
    n = positions.shape[0]
    return float(n * C * patch * patch), float(W * (lines + bands * (patch - 1)) * (C + 3) + n * patch)


def time_loss(sr: torch.Tensor, hr: torch.Tensor, positions: torch.Tensor, path: str, repeats: int) -> float:
    from metaf2n.ssl import ops

    times = []
    for _ in range(repeats):
        x = sr.clone().requires_grad_()
        t0 = time.perf_counter()
        ops.ssl_loss(x, hr, positions, SEARCH, PATCH, H, path=path).backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sweep(repeats: int, out: Path) -> str:
    """Direct vs dense fused loss (fwd + bwd) against mask density on the 256^2 crop; fits auto's cost ratio."""
    from metaf2n.ssl import edge_mask

    sr, hr = crop_pair(256)
    points = [(stride, 20.0) for stride in range(1, 9)] + [(1, float(t)) for t in (5, 10, 15, 30, 40, 50, 60)]
    results = []
    for stride, threshold in points:
        positions = torch.nonzero(edge_mask(hr, threshold, stride))
        direct_work, dense_work = work_estimate(positions, hr.shape)
        auto = torch.ops.metaf2n._auto_path(hr, positions, SEARCH, PATCH, "image")
        r = {"stride": stride, "threshold": threshold, "n": positions.shape[0], "auto": auto,
             "density": positions.shape[0] / (256 * 256), "work_ratio": direct_work / dense_work}
        for path in ("direct", "dense"):
            r[path] = time_loss(sr, hr, positions, path, repeats)
        results.append(r)
        print(f"  stride {stride} threshold {threshold:g}: N = {r['n']}, direct {1e3 * r['direct']:.0f} ms, "
              f"dense {1e3 * r['dense']:.0f} ms", file=sys.stderr, flush=True)
    # Auto picks dense when work_ratio > ratio: the fitted ratio is the work ratio where the measured time ratio
    # crosses 1 (interpolated in log-log); the crossover density is where it crosses on the density axis.
    def crossing(points: list[dict], key: str) -> float | None:
        for lo, hi in itertools.pairwise(points):
            a, b = np.log(lo["direct"] / lo["dense"]), np.log(hi["direct"] / hi["dense"])
            if a < 0 <= b:
                t = -a / (b - a)
                if key == "work_ratio":
                    return float(np.exp(np.log(lo[key]) + t * (np.log(hi[key]) - np.log(lo[key]))))
                return lo[key] + t * (hi[key] - lo[key])
        return None

    by_density = sorted(results, key=lambda r: r["density"])
    crossover = crossing(by_density, "density")
    ratio = crossing(sorted(results, key=lambda r: r["work_ratio"]), "work_ratio")
    lines = [
        (f"Direct vs dense SSL on the 256^2 crop ({torch.get_num_threads()} threads): fused loss forward + backward, "
        f"search {SEARCH}, patch {PATCH}"),
        "",
        "| stride | threshold | N | density | direct ms | dense ms | dense speed-up | work ratio (direct/dense) | auto picks |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in by_density:
        lines.append(
            f"| {r['stride']} | {r['threshold']:g} | {r['n']} | {100 * r['density']:.1f}% | {1e3 * r['direct']:.1f} | "
            f"{1e3 * r['dense']:.1f} | {r['direct'] / r['dense']:.2f}x | {r['work_ratio']:.2f} | {r['auto']} |"
        )
    if crossover is None or ratio is None:
        lines += ["", "The paths did not cross in this range of densities."]
    else:
        lines += ["", f"Measured crossover density: {100 * crossover:.1f}%; work ratio there (kDenseCostRatio): {ratio:.2f}."]
    table = "\n".join(lines)
    (out / "bench_ssl_sweep.json").write_text(json.dumps({"points": results, "ratio": ratio, "crossover": crossover}))
    plot_sweep(by_density, crossover, out / "bench_ssl_sweep.png")
    return table


def plot_sweep(results: list[dict], crossover: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    density = [100 * r["density"] for r in results]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in ("direct", "dense"):
        ax.plot(density, [1e3 * r[name] for r in results], "o-", label=f"{name} path")
    if crossover is not None:
        ax.axvline(100 * crossover, color="grey", linestyle="--", label=f"crossover {100 * crossover:.1f}%")
    ax.set_xlabel("mask density (% of pixels)")
    ax.set_ylabel("fused loss forward + backward (ms)")
    ax.set_title("SSL on a 256^2 crop: direct vs dense against mask density")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def accuracy() -> str:
    """Largest row error of float32 graphs against float64 (relative to the row's maximum), per path."""
    from metaf2n.ssl import edge_mask, ops

    sr, _ = crop_pair(256)
    positions = torch.nonzero(edge_mask(sr))
    lines = ["| padding | path | max row error vs float64 (relative) |", "|---|---|---|"]
    for padding in ("image", "window"):
        exact = ops.similarity_graph(sr.double(), positions, SEARCH, PATCH, H, padding, "direct")
        for path in ("direct", "dense"):
            rows = ops.similarity_graph(sr, positions, SEARCH, PATCH, H, padding, path).double()
            err = ((rows - exact).abs().amax(1) / exact.abs().amax(1)).max().item()
            lines.append(f"| {padding} | {path} | {err:.2e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--sweep", action="store_true", help="direct vs dense against mask density (256^2), then exit")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    parser.add_argument("--out", type=Path, default=Path("results/bench"), help="folder for the table and the plot")
    parser.add_argument("--skip-reference", action="store_true", help="time only our ops")
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA section even when a GPU is present")
    parser.add_argument("--worker", nargs=2, metavar=("SIZE", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(int(args.worker[0]), args.worker[1], args.repeats)))
        return 0

    from metaf2n.ssl import edge_mask

    args.out.mkdir(parents=True, exist_ok=True)
    if args.sweep:
        table = sweep(args.repeats, args.out) + "\n\nfloat32 accuracy on the 256^2 crop:\n\n" + accuracy()
        print(table)
        (args.out / "bench_ssl_sweep.md").write_text(table + "\n")
        print(f"\nwrote {args.out / 'bench_ssl_sweep.md'} and {args.out / 'bench_ssl_sweep.png'}", file=sys.stderr)
        return 0
    results = []
    for size in args.sizes:
        n = int(edge_mask(crop_pair(size)[1]).sum())
        for impl in IMPLS:
            if impl == "reference" and args.skip_reference:
                continue
            if impl == "reference" and reference_memory_estimate(n) > REFERENCE_MEMORY_LIMIT:
                gb = reference_memory_estimate(n) / 1e9
                results.append({"size": size, "impl": impl, "n": n, "skipped": f"skipped: needs ~{gb:.0f} GB"})
                continue
            print(f"measuring {impl} at {size}^2 (N = {n}) ...", file=sys.stderr, flush=True)
            results.append(run_in_subprocess(size, impl, args.repeats))
    table = format_table(results, measure_matmul_peak())
    print(table)
    (args.out / "bench_ssl_cpu.md").write_text(table + "\n")
    (args.out / "bench_ssl_cpu.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "bench_ssl_cpu.png")
    print(f"\nwrote {args.out / 'bench_ssl_cpu.md'} and {args.out / 'bench_ssl_cpu.png'}", file=sys.stderr)

    if not args.no_cuda and torch.cuda.is_available():
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import bench_ssl_cuda

        return bench_ssl_cuda.main(["--out", str(args.out)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
