"""Real-ESRGAN's U-Net discriminator with spectral normalisation.

Parameter names match ``RealESRGAN_x4plus_netD.pth`` (key ``params``): ``conv0.{weight,bias}``,
``conv{1..8}.{weight_orig,weight_u,weight_v}`` (spectral norm, no bias) and ``conv9.{weight,bias}``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm

LEAKY_SLOPE = 0.2


def _sn_conv(in_ch: int, out_ch: int, kernel_size: int, stride: int) -> nn.Module:
    return spectral_norm(nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding=1, bias=False))


class UNetDiscriminatorSN(nn.Module):
    """Per-pixel real/fake logits: (B, num_in_ch, H, W) -> (B, 1, H, W); H and W divisible by 8.

    Three 4x4 stride-2 downsampling convs, three bilinear x2 upsamplings (with skip
    connections to the matching encoder features when ``skip_connection``), two extra
    3x3 convs and a plain 3x3 output conv. LeakyReLU 0.2 after every conv except the last.
    """

    def __init__(self, num_in_ch: int = 3, num_feat: int = 64, skip_connection: bool = True) -> None:
        super().__init__()
        for name, value in (("num_in_ch", num_in_ch), ("num_feat", num_feat)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.skip_connection = bool(skip_connection)
        f = num_feat
        self.conv0 = nn.Conv2d(num_in_ch, f, kernel_size=3, stride=1, padding=1)
        self.conv1 = _sn_conv(f, f * 2, 4, 2)
        self.conv2 = _sn_conv(f * 2, f * 4, 4, 2)
        self.conv3 = _sn_conv(f * 4, f * 8, 4, 2)
        self.conv4 = _sn_conv(f * 8, f * 4, 3, 1)
        self.conv5 = _sn_conv(f * 4, f * 2, 3, 1)
        self.conv6 = _sn_conv(f * 2, f, 3, 1)
        self.conv7 = _sn_conv(f, f, 3, 1)
        self.conv8 = _sn_conv(f, f, 3, 1)
        self.conv9 = nn.Conv2d(f, 1, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % 8 or w % 8:
            raise ValueError(f"input height and width must be divisible by 8, got {h}x{w}")

        def act(t: torch.Tensor) -> torch.Tensor:
            return F.leaky_relu(t, LEAKY_SLOPE)

        def up(t: torch.Tensor) -> torch.Tensor:
            return F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False)

        x0 = act(self.conv0(x))
        x1 = act(self.conv1(x0))
        x2 = act(self.conv2(x1))
        x3 = act(self.conv3(x2))

        x4 = act(self.conv4(up(x3)))
        if self.skip_connection:
            x4 = x4 + x2
        x5 = act(self.conv5(up(x4)))
        if self.skip_connection:
            x5 = x5 + x1
        x6 = act(self.conv6(up(x5)))
        if self.skip_connection:
            x6 = x6 + x0

        out = act(self.conv7(x6))
        out = act(self.conv8(out))
        return self.conv9(out)
