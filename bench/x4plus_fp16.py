"""How much the fp16 storage of the released x4plus weights can matter: every convolution weight is moved to a random
point within half an fp16 step of its value (the interval the fp16 export rounded it into), and the x4plus output on
a real photo crop is compared with the unmoved weights' output. Prints the largest change over a few draws.

    python bench/x4plus_fp16.py [--draws 3] [--size 64]
"""

from __future__ import annotations

import argparse

import numpy as np
import skimage.data
import torch

from metaf2n.models import RRDBNet, load_pretrained
from metaf2n.weights import REALESRGAN_FILE, cache_root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--size", type=int, default=64, help="side of the LR crop of scikit-image's astronaut")
    args = parser.parse_args()
    path = cache_root() / REALESRGAN_FILE
    rgb = skimage.data.astronaut()[60 : 60 + args.size, 150 : 150 + args.size]
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        reference = load_pretrained(RRDBNet(), path).eval()(x).clamp(0, 1)
    generator = torch.Generator().manual_seed(0)
    print("| draw | max abs change of the output | in 8-bit levels | mean abs change |")
    print("|---|---|---|---|")
    for draw in range(args.draws):
        model = load_pretrained(RRDBNet(), path).eval()
        with torch.no_grad():
            for name, weight in model.named_parameters():
                if name.endswith("weight"):
                    half = weight.half()
                    step = (torch.nextafter(half, torch.full_like(half, float("inf"))).float() - half.float()).abs()
                    weight.add_((torch.rand(weight.shape, generator=generator) - 0.5) * step)
            change = (model(x).clamp(0, 1) - reference).abs()
        print(f"| {draw} | {change.max():.2e} | {255 * change.max():.2f} | {change.mean():.2e} |")


if __name__ == "__main__":
    main()
