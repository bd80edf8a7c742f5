"""Benchmark of the CUDA self-similarity ops (fused SSL loss and graph op) against the plain-PyTorch oracle.

Real-photo batches (skimage astronaut / coffee / chelsea / rocket, cropped or reflect-tiled to 16 x 256^2 and
4 x 512^2), HR = crop, SR = bicubic down x4 / up x4, edge mask of HR (threshold 20), default settings search 25,
patch 9, h 0.004. Times are medians of CUDA-event timings after warm-up; memory is the peak allocated during the
call minus what was allocated before it (inputs excluded). The reference is run exactly as it is (per chunk of
rows), on the full row set when its estimated memory fits in 60% of the free GPU memory, otherwise on a prefix of
the rows that fits (both ops are then timed on that prefix).

Usage: python bench/bench_ssl_cuda.py [--out DIR] [--repeats 7] [--quick]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys

import torch
import torch.nn.functional as F

SEARCH, PATCH, H, THRESHOLD = 25, 9, 0.004, 20.0
FLOP_NOTE = (
    "TFLOP/s use the direct-method count D = N*K*C*patch^2 differences at 3 flops each (sub, mul, add): "
    "loss forward 2 graphs = 6D; loss forward+backward = 6D + 6D (the backward recomputes both graphs) + 4D "
    "(each difference's gradient onto its two pixels: mul by the weight, mul by the difference, two adds) = 16D; "
    "graph forward 3D, graph forward+backward 3D + 4D = 7D. 'x bound' = time / (flops / fp32 peak)."
)


def photos(size: int, count: int, device) -> torch.Tensor:
    """count crops (count, 3, size, size) in [0, 1] from four skimage photos (reflect-tiled where smaller)."""
    from skimage import data

    images = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    crops = []
    per = math.ceil(count / len(images))
    for i, arr in enumerate(images):
        img = torch.from_numpy(arr.copy()).permute(2, 0, 1).float()[None] / 255
        ph, pw = max(0, size - img.shape[2]), max(0, size - img.shape[3])
        while ph or pw:  # reflect padding is limited to the image size: tile in steps
            sh, sw = min(ph, img.shape[2] - 1), min(pw, img.shape[3] - 1)
            img = F.pad(img, (0, sw, 0, sh), mode="reflect")
            ph, pw = ph - sh, pw - sw
        hh, ww = img.shape[2], img.shape[3]
        for j in range(per):
            if len(crops) == count:
                break
            y = (j * 97 + i * 31) % (hh - size + 1)
            x = (j * 61 + i * 17) % (ww - size + 1)
            crops.append(img[0, :, y : y + size, x : x + size])
    return torch.stack(crops).to(device).contiguous()


def degrade(hr: torch.Tensor, scale: int = 4) -> torch.Tensor:
    h, w = hr.shape[-2:]
    low = F.interpolate(hr, size=(h // scale, w // scale), mode="bicubic", align_corners=False, antialias=True)
    return F.interpolate(low, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1).contiguous()


def timed(fn, warmup: int, repeats: int):
    """(median ms, peak extra MiB) of fn() on the current stream."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return statistics.median(times), peak


def fp32_peak_tflops(n: int = 8192) -> float:
    torch.backends.cuda.matmul.allow_tf32 = False
    a = torch.randn(n, n, device="cuda")
    b = torch.randn(n, n, device="cuda")
    ms, _ = timed(lambda: a @ b, 2, 5)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def reference_bytes(n_rows: int, channels: int, elem: int, graphs: int = 2) -> float:
    """Rough peak of metaf2n.reference forward+backward: autograd keeps ~3 tensors of C*patch^2*K per row."""
    return n_rows * channels * PATCH * PATCH * SEARCH * SEARCH * elem * (3 + graphs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") and os.path.join(os.environ["OUT"], "bench"),
                        help="folder for bench_ssl_cuda.md and bench_ssl_cuda.png (default: $OUT/bench or none)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="only the 16 x 256^2 batch, fewer repeats")
    parser.add_argument("--ref-fraction", type=float, default=0.6, help="max share of free memory for the reference")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_ssl_cuda: no CUDA GPU available (torch.cuda.is_available() is False); nothing to benchmark.")
        return 2
    import metaf2n.ops as ops
    import metaf2n.reference as reference
    import metaf2n.ssl as ssl

    if not ops.has_cuda_kernels():
        print("bench_ssl_cuda: this build of metaf2n has no CUDA kernels (rebuild with METAF2N_CUDA=ON).")
        return 2
    if args.quick:
        args.repeats = min(args.repeats, 3)

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    peak = fp32_peak_tflops()
    lines = [
        f"# SSL CUDA benchmark on {props.name} (torch {torch.__version__}, CUDA {torch.version.cuda})",
        "",
        f"search {SEARCH}, patch {PATCH}, h {H}, edge threshold {THRESHOLD}; fp32 peak (8192^3 matmul, TF32 off): "
        f"{peak:.1f} TFLOP/s",
        "",
        FLOP_NOTE,
        "",
        "| batch | case | dtype | N rows | ours ms | ours MiB | ref ms | ref MiB | speed-up | TFLOP/s | x bound |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    results = []

    def row(batch, case, dtype, n, ours, ref, flops):
        ms, mib = ours
        tflops = flops / (ms * 1e-3) / 1e12 if flops else float("nan")
        bound = ms / (flops / (peak * 1e12) * 1e3) if flops else float("nan")
        if isinstance(ref, str):
            rms = rmib = ref
            speed = "-"
        elif ref is None:
            rms = rmib = speed = "-"
        else:
            rms, rmib, speed = f"{ref[0]:.2f}", f"{ref[1]:.0f}", f"{ref[0] / ms:.0f}x"
        lines.append(f"| {batch} | {case} | {dtype} | {n} | {ms:.3f} | {mib:.1f} | {rms} | {rmib} | {speed} | "
                     f"{tflops:.1f} | {bound:.2f} |")
        results.append((f"{batch} {case} {dtype}", ms, None if isinstance(ref, (str, type(None))) else ref[0]))
        print(lines[-1], flush=True)

    print("\n".join(lines))
    batches = [(16, 256)] if args.quick else [(16, 256), (4, 512)]
    for count, size in batches:
        hr = photos(size, count, dev)
        sr = degrade(hr)
        pos = ssl.mask_positions(ssl.edge_mask(hr, THRESHOLD), hr)
        n, C, K, pp = pos.shape[0], hr.shape[1], SEARCH * SEARCH, PATCH * PATCH
        D = n * K * C * pp
        name = f"{count}x{size}^2"
        G = torch.randn(n, K, device=dev)

        def loss_fwd(x=sr, t=hr, p=pos):
            with torch.no_grad():
                return ops.ssl_loss(x, t, p, SEARCH, PATCH, H, 1000.0, 1000.0, "image")

        def loss_fb(x=sr, t=hr, p=pos, path="direct"):
            xx = x.detach().requires_grad_()
            ops.ssl_loss(xx, t, p, SEARCH, PATCH, H, 1000.0, 1000.0, "image", path=path).backward()

        def graph_fwd(x=sr, p=pos):
            with torch.no_grad():
                return ops.similarity_graph(x, p, SEARCH, PATCH, H, "image")

        def graph_fb(x=sr, p=pos, g=G, path="direct"):
            xx = x.detach().requires_grad_()
            (ops.similarity_graph(xx, p, SEARCH, PATCH, H, "image", path=path) * g[: p.shape[0]]).sum().backward()

        def ref_loss_fb(x=sr, t=hr, p=pos):
            xx = x.detach().requires_grad_()
            reference.ssl_loss(xx, t, p, SEARCH, PATCH, H, 1000.0, 1000.0, "image").backward()

        def ref_graph_fb(x=sr, p=pos, g=G):
            xx = x.detach().requires_grad_()
            (reference.similarity_graph(xx, p, SEARCH, PATCH, H, "image") * g[: p.shape[0]]).sum().backward()

        w, r = args.warmup, args.repeats
        row(name, "loss fwd", "fp32", n, timed(loss_fwd, w, r), None, 6 * D)
        row(name, "loss fwd+bwd", "fp32", n, timed(loss_fb, w, r), None, 16 * D)
        row(name, "graph fwd", "fp32", n, timed(graph_fwd, w, r), None, 3 * D)
        row(name, "graph fwd+bwd", "fp32", n, timed(graph_fb, w, r), None, 7 * D)
        for dtype, label in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
            x16, t16 = sr.to(dtype), hr.to(dtype)
            row(name, "loss fwd+bwd", label, n, timed(lambda: loss_fb(x16, t16), w, r), None, 16 * D)
        # The dense path (box filters, always deterministic); TFLOP/s on the direct count, to compare the two.
        row(name, "loss fwd+bwd (dense)", "fp32", n, timed(lambda: loss_fb(path="dense"), w, r), None, 16 * D)
        row(name, "graph fwd+bwd (dense)", "fp32", n, timed(lambda: graph_fb(path="dense"), w, r), None, 7 * D)
        torch.use_deterministic_algorithms(True)
        try:
            row(name, "loss fwd+bwd (deterministic)", "fp32", n, timed(loss_fb, 1, max(3, r // 2)), None, 16 * D)
            row(name, "graph fwd+bwd (deterministic)", "fp32", n, timed(graph_fb, 1, max(3, r // 2)), None, 7 * D)
        finally:
            torch.use_deterministic_algorithms(False)

        # The reference: full rows if it fits, else the largest prefix that does (capped to keep the run short).
        free, _ = torch.cuda.mem_get_info()
        budget = args.ref_fraction * free
        per_row = reference_bytes(1, C, 4)
        if reference_bytes(n, C, 4) <= budget:
            m = n
        else:
            m = min(n, int(budget / per_row), 4096)
        note = "" if m == n else f" (first {m} rows: ref est. {reference_bytes(n, C, 4) / 2**30:.0f} GiB for all " \
                                 f"{n} rows > {args.ref_fraction:.0%} of free {free / 2**30:.0f} GiB)"
        if m < 1:
            row(name, "loss fwd+bwd vs ref", "fp32", n, timed(loss_fb, w, r), "skipped (memory)", 16 * D)
            continue
        sub = pos[:m]
        Dm = m * K * C * pp
        rr = max(2, r // 2)
        ref = timed(lambda: ref_loss_fb(p=sub), 1, rr)
        row(name, "loss fwd+bwd vs ref" + note, "fp32", m, timed(lambda: loss_fb(p=sub), w, r), ref, 16 * Dm)
        ref = timed(lambda: ref_graph_fb(p=sub), 1, rr)
        row(name, "graph fwd+bwd vs ref" + note, "fp32", m, timed(lambda: graph_fb(p=sub), w, r), ref, 7 * Dm)
        del hr, sr, pos, G
        torch.cuda.empty_cache()

    # Direct vs dense against mask density on 16 x 256^2 (the measurement an "auto" rule on CUDA needs).
    hr = photos(256, 16, dev)
    sr = degrade(hr)
    lines += ["", "## Direct vs dense, loss forward + backward, 16 x 256^2, fp32", "",
              "| threshold | stride | density | N rows | direct ms | dense ms | direct / dense |", "|---|---|---|---|---|---|---|"]
    for threshold, stride in ((60.0, 4), (60.0, 1), (20.0, 2), (20.0, 1), (5.0, 1), (0.0, 1)):
        pos = ssl.mask_positions(ssl.edge_mask(hr, threshold, stride), hr)
        if pos.shape[0] == 0:
            continue
        ms = {}
        for path in ("direct", "dense"):
            def fb(path=path, pos=pos):
                xx = sr.detach().requires_grad_()
                ops.ssl_loss(xx, hr, pos, SEARCH, PATCH, H, 1000.0, 1000.0, "image", path=path).backward()
            ms[path] = timed(fb, args.warmup, args.repeats)[0]
        density = pos.shape[0] / (hr.shape[0] * hr.shape[2] * hr.shape[3])
        lines.append(f"| {threshold:g} | {stride} | {density:.1%} | {pos.shape[0]} | {ms['direct']:.2f} | "
                     f"{ms['dense']:.2f} | {ms['direct'] / ms['dense']:.2f} |")
        print(lines[-1], flush=True)

    text = "\n".join(lines) + "\n"
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_ssl_cuda.md"), "w") as fh:
            fh.write(text)
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(11, 0.35 * len(results) + 1.5))
            labels = [r[0] for r in results]
            ys = range(len(results))
            ax.barh([y + 0.2 for y in ys], [r[1] for r in results], height=0.4, label="metaf2n CUDA")
            ax.barh([y - 0.2 for y in ys], [r[2] or 0 for r in results], height=0.4, label="reference (same rows)")
            ax.set_yticks(list(ys), labels, fontsize=7)
            ax.set_xscale("log")
            ax.set_xlabel("ms (median, log scale)")
            ax.set_title(f"SSL on {props.name}: search {SEARCH}, patch {PATCH}")
            ax.legend()
            fig.tight_layout()
            fig.savefig(os.path.join(args.out, "bench_ssl_cuda.png"), dpi=120)
        except ImportError:
            print("matplotlib is not installed: no plot")
        print(f"wrote {args.out}/bench_ssl_cuda.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
