"""The self-similarity loss on one demo task: ``python -m metaf2n.demo --out results/demo``.

Draws one MetaF2N task from the embedded demo set (one Real-ESRGAN degradation), takes its background patches as
HR and their bicubic x4 upsampling as a stand-in SR output, prints L1 and SSL for a few SR candidates, descends
``L1 + beta * SSL`` on the SR pixels for a few steps to show the gradient at work, and writes PNGs: the patches
with their edge masks, the similarity rows of a few edge pixels (HR vs SR), and the loss curve.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from metaf2n.data import TaskConfig, TaskSampler
from metaf2n.ssl import edge_mask, self_similarity_graph, ssl_loss

logger = logging.getLogger("metaf2n.demo")


def sample_backgrounds(seed: int, patches: int, cache_dir: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(HR, bicubic-upsampled LR) background patches of one demo task, each (patches, 3, 256, 256)."""
    sampler = TaskSampler(config=TaskConfig(face_patches=1, background_patches=patches), demo_cache_dir=cache_dir)
    batch = sampler.sample(1, torch.Generator().manual_seed(seed))
    hr = batch.bg_hr[0]
    sr = F.interpolate(batch.bg_lr[0], size=hr.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
    return sr, hr


def descend(sr: torch.Tensor, hr: torch.Tensor, mask: torch.Tensor, beta: float, steps: int, lr: float) -> list[dict]:
    """Adam on the SR pixels against ``L1 + beta * SSL``; returns the loss history."""
    x = sr.clone().requires_grad_()
    optimizer = torch.optim.Adam([x], lr=lr)
    history = []
    for step in tqdm(range(steps), desc="L1 + beta*SSL descent", unit="step"):
        l1 = F.l1_loss(x, hr)
        ssl = ssl_loss(x, hr, mask)
        optimizer.zero_grad()
        (l1 + beta * ssl).backward()
        optimizer.step()
        with torch.no_grad():
            x.clamp_(0, 1)
        history.append({"step": step, "l1": l1.item(), "ssl": ssl.item()})
    return history


def save_figures(sr, hr, mask, history, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    n = hr.shape[0]
    fig, axes = plt.subplots(n, 3, figsize=(9, 3 * n), squeeze=False)
    for i in range(n):
        for ax, image, title in zip(
            axes[i], (hr[i], sr[i], mask[i].float()[None].expand(3, -1, -1)), ("HR", "SR (bicubic x4)", "edge mask")
        ):
            ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
            ax.set_title(f"{title} [{i}]" if title != "edge mask" else f"edge mask: {int(mask[i].sum())} px")
            ax.axis("off")
    fig.tight_layout()
    paths.append(_save(fig, out / "patches.png"))
    plt.close(fig)

    positions = torch.nonzero(mask[:1])
    picks = positions[torch.linspace(0, len(positions) - 1, 4).long()]
    pick_mask = torch.zeros_like(mask[:1])
    pick_mask[picks[:, 0], picks[:, 1], picks[:, 2]] = True
    rows_hr = self_similarity_graph(hr[:1], pick_mask)
    rows_sr = self_similarity_graph(sr[:1], pick_mask)
    side = int(rows_hr.shape[1] ** 0.5)
    fig, axes = plt.subplots(2, len(picks), figsize=(3 * len(picks), 6), squeeze=False)
    for j, (b, y, x) in enumerate(torch.nonzero(pick_mask).tolist()):
        for row, (rows, name) in enumerate(((rows_hr, "HR"), (rows_sr, "SR"))):
            axes[row, j].imshow(rows[j].view(side, side).numpy(), cmap="magma")
            axes[row, j].set_title(f"{name} graph at (y={y}, x={x})")
            axes[row, j].axis("off")
    fig.suptitle("self-similarity rows S(p, p + (dy, dx)) over the 25 x 25 search window")
    fig.tight_layout()
    paths.append(_save(fig, out / "similarity_rows.png"))
    plt.close(fig)

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    ax[0].plot([h["l1"] for h in history])
    ax[0].set_title("L1")
    ax[1].plot([h["ssl"] for h in history])
    ax[1].set_title("SSL")
    for a in ax:
        a.set_xlabel("step")
    fig.tight_layout()
    paths.append(_save(fig, out / "loss_curve.png"))
    plt.close(fig)
    return paths


def _save(fig, path: Path) -> Path:
    """Write atomically: a reader never sees half a PNG."""
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent)
    os.close(fd)
    fig.savefig(tmp, dpi=90)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results/demo"), help="folder for the PNGs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--patches", type=int, default=2, help="background patches (256 x 256) in the task")
    parser.add_argument("--steps", type=int, default=20, help="descent steps on L1 + beta * SSL")
    parser.add_argument("--beta", type=float, default=0.1, help="weight of SSL in the descent")
    parser.add_argument("--cache-dir", default=None, help="where the demo set is cached (default ~/.cache/metaf2n)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)

    sr, hr = sample_backgrounds(args.seed, args.patches, args.cache_dir)
    mask = edge_mask(hr)
    noisy = (hr + 0.03 * torch.randn(hr.shape, generator=torch.Generator().manual_seed(args.seed))).clamp(0, 1)
    print(f"demo task (seed {args.seed}): {hr.shape[0]} background patches of {hr.shape[-1]}^2, "
          f"{int(mask.sum())} edge pixels (Laplacian > 20)")
    print(f"{'SR candidate':<28}{'L1':>10}{'SSL':>12}{'SSL ms (fwd+bwd)':>20}")
    for name, candidate in (("HR itself", hr), ("HR + 3% noise", noisy), ("bicubic x4 of the LR", sr)):
        x = candidate.clone().requires_grad_()
        start = time.perf_counter()
        loss = ssl_loss(x, hr, mask)
        loss.backward()
        ms = 1e3 * (time.perf_counter() - start)
        print(f"{name:<28}{F.l1_loss(candidate, hr).item():>10.4f}{loss.item():>12.4f}{ms:>20.1f}")

    history = descend(sr, hr, mask, args.beta, args.steps, lr=2e-3)
    first, last = history[0], history[-1]
    print(f"descent on L1 + {args.beta}*SSL: L1 {first['l1']:.4f} -> {last['l1']:.4f}, "
          f"SSL {first['ssl']:.4f} -> {last['ssl']:.4f} in {args.steps} steps")
    for path in save_figures(sr, hr, mask, history, args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
