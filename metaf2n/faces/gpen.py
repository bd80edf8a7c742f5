"""GPEN (GAN Prior Embedded Network, Yang et al., CVPR 2021): the face restorer MetaF2N's official code uses.

``GPEN(size=512)`` and ``GPEN(size=256)`` are GPEN's ``FullGenerator`` with the constructor arguments of the
released GPEN-BFR-512 (channel multiplier 2, narrow 1) and GPEN-BFR-256 (channel multiplier 1, narrow 0.5) models:
style dim 512, 8 MLP layers, blur kernel [1, 3, 3, 1], MLP learning-rate multiplier 0.01, encoder features
concatenated as noise. Parameter names are those of the released files (163 tensors for 512 px, of which 21 are
blur kernels; 144 for 256 px), so they load with ``strict=True``. StyleGAN2's fused bias-LeakyReLU and upfirdn2d are
written here in plain PyTorch.

Input and output (GPEN's ``face_gan.py``): an aligned RGB face at ``size`` px, values in [-1, 1].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

BLUR = (1.0, 3.0, 3.0, 1.0)
RELEASED = {512: dict(channel_multiplier=2, narrow=1.0), 256: dict(channel_multiplier=1, narrow=0.5)}


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)):
    """Upsample by zero insertion, pad (negative pads crop), FIR-filter with ``kernel``, keep every ``down``-th."""
    b, c, h, w = x.shape
    out = x.reshape(b * c, 1, h, w)
    if up > 1:
        out = F.pad(out.view(b * c, 1, h, 1, w, 1), [0, up - 1, 0, 0, 0, up - 1]).view(b * c, 1, h * up, w * up)
    out = F.pad(out, [pad[0], pad[1], pad[0], pad[1]])
    out = F.conv2d(out, torch.flip(kernel, [0, 1])[None, None].to(out.dtype))
    out = out[:, :, ::down, ::down]
    return out.reshape(b, c, *out.shape[-2:])


def _kernel(factor: float = 1.0) -> torch.Tensor:
    k = torch.tensor(BLUR)
    k = k[None, :] * k[:, None]
    return k / k.sum() * factor


def fused_leaky_relu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """StyleGAN2's fused op: LeakyReLU 0.2 of x + bias (per channel), times sqrt(2)."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return F.leaky_relu(x + bias.view(shape), 0.2) * math.sqrt(2)


class FusedLeakyReLU(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_leaky_relu(x, self.bias)


class Blur(nn.Module):
    def __init__(self, pad: tuple[int, int], factor: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("kernel", _kernel(factor))
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, pad=self.pad)


class Upsample(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("kernel", _kernel(4.0))
        self.pad = (2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, up=2, pad=self.pad)


class EqualConv2d(nn.Module):
    """Conv with weights scaled by 1/sqrt(fan_in) at run time (equalised learning rate)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
        self.scale = 1 / math.sqrt(cin * kernel**2)
        self.stride, self.padding = stride, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.scale, self.bias, self.stride, self.padding)


class EqualLinear(nn.Module):
    def __init__(self, din: int, dout: int, bias_init: float = 0.0, lr_mul: float = 1.0, activate: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dout, din) / lr_mul)
        self.bias = nn.Parameter(torch.full((dout,), float(bias_init)))
        self.scale, self.lr_mul, self.activate = lr_mul / math.sqrt(din), lr_mul, activate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activate:
            return fused_leaky_relu(F.linear(x, self.weight * self.scale), self.bias * self.lr_mul)
        return F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)


class ConvLayer(nn.Sequential):
    """[Blur] + EqualConv2d (+ fused bias-LeakyReLU): keys ``{0,1,2}.*`` as in StyleGAN2's ConvLayer."""

    def __init__(self, cin: int, cout: int, kernel: int, downsample: bool = False) -> None:
        layers: list[nn.Module] = []
        if downsample:
            p = (len(BLUR) - 2) + (kernel - 1)
            layers.append(Blur(((p + 1) // 2, p // 2)))
        layers.append(EqualConv2d(cin, cout, kernel, stride=2 if downsample else 1,
                                  padding=0 if downsample else kernel // 2, bias=False))
        layers.append(FusedLeakyReLU(cout))
        super().__init__(*layers)


class ModulatedConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, style_dim: int, demodulate: bool = True,
                 upsample: bool = False) -> None:
        super().__init__()
        self.cin, self.cout, self.kernel = cin, cout, kernel
        self.demodulate, self.upsample = demodulate, upsample
        if upsample:
            p = (len(BLUR) - 2) - (kernel - 1)
            self.blur = Blur(((p + 1) // 2 + 1, p // 2 + 1), factor=4.0)
        self.scale = 1 / math.sqrt(cin * kernel**2)
        self.weight = nn.Parameter(torch.randn(1, cout, cin, kernel, kernel))
        self.modulation = EqualLinear(style_dim, cin, bias_init=1.0)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        weight = self.scale * self.weight * self.modulation(style).view(b, 1, self.cin, 1, 1)
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + 1e-8).view(b, self.cout, 1, 1, 1)
        x = x.reshape(1, b * self.cin, h, w)
        if self.upsample:
            weight = weight.transpose(1, 2).reshape(b * self.cin, self.cout, self.kernel, self.kernel)
            out = F.conv_transpose2d(x, weight, padding=0, stride=2, groups=b)
            return self.blur(out.view(b, self.cout, *out.shape[-2:]))
        out = F.conv2d(x, weight.reshape(b * self.cout, self.cin, self.kernel, self.kernel),
                       padding=self.kernel // 2, groups=b)
        return out.view(b, self.cout, *out.shape[-2:])


class NoiseInjection(nn.Module):
    """Concatenates ``weight * noise`` to the features (GPEN's noise is the encoder's feature map)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.weight * noise], dim=1)


class StyledConv(nn.Module):
    def __init__(self, cin: int, cout: int, style_dim: int, upsample: bool = False) -> None:
        super().__init__()
        self.conv = ModulatedConv2d(cin, cout, 3, style_dim, upsample=upsample)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(cout * 2)

    def forward(self, x: torch.Tensor, style: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.activate(self.noise(self.conv(x, style), noise))


class ToRGB(nn.Module):
    def __init__(self, cin: int, style_dim: int, upsample: bool = True) -> None:
        super().__init__()
        if upsample:
            self.upsample = Upsample()
        self.conv = ModulatedConv2d(cin, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        out = self.conv(x, style) + self.bias
        return out if skip is None else out + self.upsample(skip)


class ConstantInput(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channels, 4, 4))

    def forward(self, batch: int) -> torch.Tensor:
        return self.input.expand(batch, -1, -1, -1)


def _channels(channel_multiplier: float, narrow: float) -> dict[int, int]:
    widths = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * channel_multiplier, 128: 128 * channel_multiplier,
              256: 64 * channel_multiplier, 512: 32 * channel_multiplier, 1024: 16 * channel_multiplier}
    return {res: int(width * narrow) for res, width in widths.items()}


class Generator(nn.Module):
    def __init__(self, size: int, style_dim: int, n_mlp: int, channels: dict[int, int], lr_mlp: float) -> None:
        super().__init__()
        self.style = nn.Sequential(_PixelNorm(), *(EqualLinear(style_dim, style_dim, lr_mul=lr_mlp, activate=True)
                                                   for _ in range(n_mlp)))
        self.input = ConstantInput(channels[4])
        self.conv1 = StyledConv(channels[4], channels[4], style_dim)
        self.to_rgb1 = ToRGB(channels[4] * 2, style_dim, upsample=False)
        self.log_size = int(math.log2(size))
        self.convs = nn.ModuleList()
        self.upsamples = nn.ModuleList()  # empty, as in GPEN
        self.to_rgbs = nn.ModuleList()
        cin = channels[4]
        for level in range(3, self.log_size + 1):
            cout = channels[2**level]
            self.convs.append(StyledConv(cin * 2, cout, style_dim, upsample=True))
            self.convs.append(StyledConv(cout * 2, cout, style_dim))
            self.to_rgbs.append(ToRGB(cout * 2, style_dim))
            cin = cout

    def forward(self, style: torch.Tensor, noise: list[torch.Tensor]) -> torch.Tensor:
        latent = self.style(style)  # the same w for every layer
        out = self.conv1(self.input(latent.shape[0]), latent, noise[0])
        skip = self.to_rgb1(out, latent)
        for index, (conv1, conv2, to_rgb) in enumerate(zip(self.convs[::2], self.convs[1::2], self.to_rgbs)):
            out = conv1(out, latent, noise[1 + 2 * index])
            out = conv2(out, latent, noise[2 + 2 * index])
            skip = to_rgb(out, latent, skip)
        return skip


class _PixelNorm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(torch.mean(x**2, dim=1, keepdim=True) + 1e-8)


class GPEN(nn.Module):
    """``forward(x)``: (B, 3, size, size) RGB faces in [-1, 1] -> restored faces in [-1, 1]."""

    def __init__(self, size: int = 512, style_dim: int = 512, n_mlp: int = 8, channel_multiplier: float | None = None,
                 narrow: float | None = None, lr_mlp: float = 0.01) -> None:
        super().__init__()
        if size not in RELEASED and (channel_multiplier is None or narrow is None):
            raise ValueError(f"size {size} has no released configuration ({tuple(RELEASED)}): give "
                             "channel_multiplier and narrow")
        defaults = RELEASED.get(size, {})
        channel_multiplier = defaults["channel_multiplier"] if channel_multiplier is None else channel_multiplier
        narrow = defaults["narrow"] if narrow is None else narrow
        channels = _channels(channel_multiplier, narrow)
        self.size = size
        self.log_size = int(math.log2(size))
        self.generator = Generator(size, style_dim, n_mlp, channels, lr_mlp)
        self.ecd0 = nn.Sequential(ConvLayer(3, channels[size], 1))
        cin = channels[size]
        for level in range(self.log_size, 2, -1):
            cout = channels[2 ** (level - 1)]
            setattr(self, f"ecd{self.log_size - level + 1}", nn.Sequential(ConvLayer(cin, cout, 3, downsample=True)))
            cin = cout
        self.final_linear = nn.Sequential(EqualLinear(channels[4] * 16, style_dim, activate=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[-2:] != (self.size, self.size):
            raise ValueError(f"x must be (B, 3, {self.size}, {self.size}), got {tuple(x.shape)}")
        features = []
        for index in range(self.log_size - 1):
            x = getattr(self, f"ecd{index}")(x)
            features.append(x)
        style = self.final_linear(x.flatten(1))
        # each encoder map feeds the two convs of its resolution (the 4x4 one feeds conv1 only), coarse to fine
        noise = [f for f in features for _ in range(2)][::-1][1:]
        return self.generator(style, noise)
