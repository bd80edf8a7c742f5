"""Time per meta-step of MetaF2N + SSL training, split into its phases, with SSL on and off, fp32 vs bf16.

    python bench/bench_train.py                                  # demo size on the CPU (+ paper size on a GPU)
    python bench/bench_train.py --presets demo paper --steps 5 --out results/bench

Each (preset, precision, SSL) setting runs in a fresh subprocess (peak memory is its own): a few untimed meta-steps,
then ``--steps`` timed ones through ``MetaTrainer.meta_update`` with its phase timers. Phases: task sampling (data
and degradation), inner loop (MaskNet + the adaptation step), outer forward (SR of the backgrounds, L1, LPIPS, GAN,
regulariser), SSL (the fused loss and its gradient), outer backward, optimizer (gradient norms, Adam) and the
discriminator step. Peak memory: CUDA's max allocated over the timed steps, or on the CPU the rise of the process's
peak resident set over what it held before the first step (models, optimisers, LPIPS and data already loaded).
Prints a markdown table and writes ``bench_train_<device>.{md,png,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

PHASES = ("sampling", "inner", "outer_forward", "ssl", "outer_backward", "optimizer", "discriminator")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def lpips_available(weights: str | None) -> bool:
    try:
        import lpips  # noqa: F401

        from metaf2n.weights import find_lpips_alexnet

        find_lpips_alexnet(weights)
        return True
    except (ImportError, FileNotFoundError):
        return False


def worker(preset: str, precision: str, ssl: bool, mode: str, steps: int, warmup: int, device: str,
           lpips_weights: str | None) -> dict:
    from metaf2n.config import resolve
    from metaf2n.trainer import MetaTrainer

    overrides = {"preset": preset, "precision": precision, "mode": mode, "device": device, "out": "/nonexistent"}
    if not ssl:
        overrides["w_ssl"] = 0.0
    with_lpips = lpips_available(lpips_weights)
    if not with_lpips:
        overrides["w_lpips"] = 0.0
    if lpips_weights:
        overrides["lpips_weights"] = lpips_weights
    config = resolve(overrides)
    trainer = MetaTrainer(config)
    dev = trainer.device
    rss_before = current_rss()  # models, optimisers, LPIPS and the data are resident by now
    for _ in range(warmup):
        trainer.meta_update(trainer.sample_tasks())
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = trainer.sample_tasks()
        timings["sampling"] = timings.get("sampling", 0.0) + time.perf_counter() - t0
        trainer.meta_update(batch, timings)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
    else:
        peak = peak_rss() - rss_before
    total = time.perf_counter() - start
    return {
        "preset": preset, "precision": precision, "ssl": ssl, "mode": mode, "device": str(dev), "lpips": with_lpips,
        "steps": steps, "step_s": total / steps, "phases_s": {k: timings.get(k, 0.0) / steps for k in PHASES},
        "peak_bytes": peak, "threads": torch.get_num_threads(),
        "tasks": config.tasks, "patches": f"{config.face_patches}+{config.background_patches}",
        "sizes": f"{config.face_patch_size // 4}->{config.face_patch_size}, "
                 f"{config.background_patch_size // 4}->{config.background_patch_size}",
        "net": f"RRDBNet {config.num_block}x{config.num_feat}",
    }


def run_in_subprocess(args: argparse.Namespace, preset: str, precision: str, ssl: bool, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", preset, precision, str(int(ssl)), mode, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--device", args.device]
    if args.lpips_weights:
        cmd += ["--lpips-weights", args.lpips_weights]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        return {"preset": preset, "precision": precision, "ssl": ssl, "mode": mode, "error": result.stderr.strip()[-800:]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def format_table(results: list[dict]) -> str:
    head = ("| preset | MAML | precision | SSL | step | " + " | ".join(PHASES) + " | SSL share | peak memory |\n"
            "|" + "---|" * (len(PHASES) + 7) + "\n")
    rows = []
    for r in results:
        if "error" in r:
            rows.append(f"| {r['preset']} | {r['mode']} | {r['precision']} | {'on' if r['ssl'] else 'off'} | failed: "
                        f"{r['error'].splitlines()[-1] if r['error'] else '?'} |")
            continue
        phases = " | ".join(f"{1000 * r['phases_s'][k]:.0f}" for k in PHASES)
        share = r["phases_s"]["ssl"] / r["step_s"]
        rows.append(f"| {r['preset']} | {r['mode']} | {r['precision']} | {'on' if r['ssl'] else 'off'} | "
                    f"{1000 * r['step_s']:.0f} | {phases} | {100 * share:.1f}% | {r['peak_bytes'] / 2**20:.0f} MiB |")
    notes = []
    for preset in dict.fromkeys(r["preset"] for r in results if "error" not in r):
        r = next(x for x in results if x["preset"] == preset and "error" not in x)
        notes.append(f"- {preset}: {r['net']}, {r['tasks']} tasks x {r['patches']} patches, LR->HR {r['sizes']}, "
                     f"device {r['device']}, {r['threads']} threads, LPIPS {'on' if r['lpips'] else 'OFF (no weights)'}")
        if not r["device"].startswith("cuda"):
            notes.append("  - peak memory on the CPU is the rise of the process's peak resident set from the first step "
                         "on; at small sizes the allocator's arenas dominate it, so settings read alike")
        first = [x for x in results if x["preset"] == preset and x["mode"] == "first" and "error" not in x]
        on = {x["precision"]: x for x in first if x["ssl"]}
        off = {x["precision"]: x for x in first if not x["ssl"]}
        for precision in on:
            if precision in off:
                notes.append(f"  - {precision}: SSL on / off step time = "
                             f"{on[precision]['step_s'] / off[precision]['step_s']:.2f}x")
        second = [x for x in results if x["preset"] == preset and x["mode"] == "second" and "error" not in x]
        for x in second:
            ref = next((y for y in first if y["precision"] == x["precision"] and y["ssl"] == x["ssl"]), None)
            if ref:
                notes.append(f"  - second- vs first-order MAML ({x['precision']}, SSL {'on' if x['ssl'] else 'off'}): "
                             f"time {x['step_s'] / ref['step_s']:.2f}x, peak memory "
                             f"{x['peak_bytes'] / max(ref['peak_bytes'], 1):.2f}x")
    return ("Milliseconds per meta-step by phase (mean over the timed steps):\n\n" + head + "\n".join(rows) + "\n\n"
            + "\n".join(notes) + "\n")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    if not ok:
        return
    labels = [f"{r['preset']} {r['mode']}\n{r['precision']}\nSSL {'on' if r['ssl'] else 'off'}" for r in ok]
    fig, ax = plt.subplots(figsize=(1.6 * len(ok) + 2, 4.5))
    bottom = [0.0] * len(ok)
    for phase in PHASES:
        values = [1000 * r["phases_s"][phase] for r in ok]
        ax.bar(labels, values, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("ms per meta-step")
    ax.set_title("MetaF2N + SSL meta-step by phase")
    ax.legend(fontsize=8, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", nargs=4, metavar=("PRESET", "PRECISION", "SSL", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--presets", nargs="+", default=None, help="default: demo, plus paper on a GPU")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--lpips-weights", default=None)
    parser.add_argument("--out", default="results/bench")
    args = parser.parse_args(argv)
    if args.worker:
        preset, precision, ssl, mode = args.worker
        result = worker(preset, precision, ssl == "1", mode, args.steps, args.warmup, args.device, args.lpips_weights)
        print(json.dumps(result))
        return 0
    gpu = torch.cuda.is_available() and args.device != "cpu"
    presets = args.presets or (["demo", "paper"] if gpu else ["demo"])
    results = []
    settings = [(precision, ssl, "first") for precision in args.precisions for ssl in (True, False)]
    settings.append(("fp32", True, "second"))  # the cost of second-order MAML
    for preset in presets:
        for precision, ssl, mode in settings:
            print(f"running {preset} {mode}-order {precision} SSL {'on' if ssl else 'off'} ...", file=sys.stderr,
                  flush=True)
            results.append(run_in_subprocess(args, preset, precision, ssl, mode))
    table = format_table(results)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "cuda" if gpu else "cpu"
    (out / f"bench_train_{tag}.md").write_text(table)
    (out / f"bench_train_{tag}.json").write_text(json.dumps(results, indent=2))
    plot(results, out / f"bench_train_{tag}.png")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
