"""One meta-step of the paper-size network (RRDBNet 23 x 64, MaskNet 64, D 64) at the demo preset's patch sizes, on
the CPU, with the networks in NCHW or channels_last layout; each layout in its own process.

    python bench/bench_metastep_layout.py [--steps 3]

Prints the seconds of each timed step (after one untimed one) and their mean per layout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def worker(layout: str, steps: int) -> list[float]:
    import torch

    from metaf2n.config import resolve
    from metaf2n.trainer import MetaTrainer

    config = resolve({"preset": "demo", "num_feat": 64, "num_block": 23, "num_grow_ch": 32, "masknet_feat": 64,
                      "d_num_feat": 64, "device": "cpu", "out": "unused"})
    trainer = MetaTrainer(config)
    if layout == "channels_last":
        for model in (trainer.sr, trainer.masknet, trainer.disc):
            model.to(memory_format=torch.channels_last)
    times = []
    for step in range(steps + 1):
        batch = trainer.sample_tasks()
        start = time.perf_counter()
        trainer.meta_update(batch)
        if step:
            times.append(time.perf_counter() - start)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps)))
        return 0
    print("| layout | seconds per meta-step | mean |\n|---|---|---|")
    for layout in ("nchw", "channels_last"):
        result = subprocess.run([sys.executable, __file__, "--worker", layout, "--steps", str(args.steps)],
                                capture_output=True, text=True, check=True)
        times = json.loads(result.stdout.strip().splitlines()[-1])
        print(f"| {layout} | {', '.join(f'{t:.2f}' for t in times)} | {sum(times) / len(times):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
