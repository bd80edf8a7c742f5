"""GFPGAN v1.3 / v1.4 ("GFPGANv1Clean"): a U-Net encoder whose features modulate a StyleGAN2 decoder (SFT).

Parameter names are those of the released ``GFPGANv1.3.pth`` / ``GFPGANv1.4.pth`` (key ``params_ema``, 285 tensors,
15 of them the decoder's stored noise maps), so they load with ``strict=True``. The configuration of the releases
(GFPGAN's ``GFPGANer``): 512 px, style dim 512, channel multiplier 2, 8 MLP layers, input-is-latent, a different w
per layer, SFT on half the channels. Everything is plain PyTorch (bilinear resampling, no compiled StyleGAN2 ops).

Input and output (GFPGAN's inference code): an aligned RGB face at 512 px, values in [-1, 1] ((x - 0.5) / 0.5).
One deviation: the decoder uses its stored noise maps (``randomize_noise=False``) unless asked otherwise, so a face
restores the same way every time; the official inference draws fresh noise per call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LEAKY = 0.2


def _channels(base: float, channel_multiplier: float) -> dict[int, int]:
    """StyleGAN2's channel count per resolution, times ``base`` (``narrow``)."""
    widths = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * channel_multiplier, 128: 128 * channel_multiplier,
              256: 64 * channel_multiplier, 512: 32 * channel_multiplier, 1024: 16 * channel_multiplier}
    return {res: int(width * base) for res, width in widths.items()}


class NormStyleCode(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(torch.mean(x**2, dim=1, keepdim=True) + 1e-8)


class ModulatedConv2d(nn.Module):
    """StyleGAN2's modulated (and optionally demodulated) conv, no bias; bilinear x2 resampling before it."""

    def __init__(self, cin: int, cout: int, kernel: int, style_dim: int, demodulate: bool = True,
                 sample_mode: str | None = None) -> None:
        super().__init__()
        self.cin, self.cout, self.kernel = cin, cout, kernel
        self.demodulate, self.sample_mode = demodulate, sample_mode
        self.modulation = nn.Linear(style_dim, cin)
        nn.init.kaiming_normal_(self.modulation.weight, a=0, mode="fan_in", nonlinearity="linear")
        nn.init.ones_(self.modulation.bias)
        self.weight = nn.Parameter(torch.randn(1, cout, cin, kernel, kernel) / math.sqrt(cin * kernel**2))

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        weight = self.weight * self.modulation(style).view(b, 1, self.cin, 1, 1)
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + 1e-8).view(b, self.cout, 1, 1, 1)
        if self.sample_mode == "upsample":
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        elif self.sample_mode == "downsample":
            x = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
        h, w = x.shape[-2:]
        out = F.conv2d(x.reshape(1, b * self.cin, h, w), weight.view(b * self.cout, self.cin, self.kernel, self.kernel),
                       padding=self.kernel // 2, groups=b)
        return out.view(b, self.cout, *out.shape[-2:])


class StyleConv(nn.Module):
    """Modulated conv x sqrt(2), noise injection (scaled by ``weight``), bias, LeakyReLU 0.2."""

    def __init__(self, cin: int, cout: int, style_dim: int, sample_mode: str | None = None) -> None:
        super().__init__()
        self.modulated_conv = ModulatedConv2d(cin, cout, 3, style_dim, True, sample_mode)
        self.weight = nn.Parameter(torch.zeros(1))
        self.bias = nn.Parameter(torch.zeros(1, cout, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        out = self.modulated_conv(x, style) * 2**0.5
        if noise is None:
            noise = out.new_empty(out.shape[0], 1, *out.shape[-2:]).normal_()
        return F.leaky_relu(out + self.weight * noise + self.bias, LEAKY)


class ToRGB(nn.Module):
    def __init__(self, cin: int, style_dim: int, upsample: bool = True) -> None:
        super().__init__()
        self.upsample = upsample
        self.modulated_conv = ModulatedConv2d(cin, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        out = self.modulated_conv(x, style) + self.bias
        if skip is not None:
            if self.upsample:
                skip = F.interpolate(skip, scale_factor=2, mode="bilinear", align_corners=False)
            out = out + skip
        return out


class ConstantInput(nn.Module):
    def __init__(self, channels: int, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, channels, size, size))

    def forward(self, batch: int) -> torch.Tensor:
        return self.weight.expand(batch, -1, -1, -1)


class StyleGAN2Decoder(nn.Module):
    """StyleGAN2's synthesis network with SFT conditions after the first conv of each resolution."""

    def __init__(self, out_size: int, style_dim: int, num_mlp: int, channel_multiplier: float, narrow: float,
                 sft_half: bool) -> None:
        super().__init__()
        self.sft_half = sft_half
        layers: list[nn.Module] = [NormStyleCode()]
        for _ in range(num_mlp):
            linear = nn.Linear(style_dim, style_dim)
            nn.init.kaiming_normal_(linear.weight, a=LEAKY, mode="fan_in", nonlinearity="leaky_relu")
            nn.init.zeros_(linear.bias)
            layers += [linear, nn.LeakyReLU(LEAKY)]
        self.style_mlp = nn.Sequential(*layers)
        channels = _channels(narrow, channel_multiplier)
        self.log_size = int(math.log2(out_size))
        self.num_layers = (self.log_size - 2) * 2 + 1
        self.constant_input = ConstantInput(channels[4], 4)
        self.style_conv1 = StyleConv(channels[4], channels[4], style_dim)
        self.to_rgb1 = ToRGB(channels[4], style_dim, upsample=False)
        self.style_convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        self.noises = nn.Module()
        for index in range(self.num_layers):
            resolution = 2 ** ((index + 5) // 2)
            self.noises.register_buffer(f"noise{index}", torch.randn(1, 1, resolution, resolution))
        cin = channels[4]
        for level in range(3, self.log_size + 1):
            cout = channels[2**level]
            self.style_convs.append(StyleConv(cin, cout, style_dim, "upsample"))
            self.style_convs.append(StyleConv(cout, cout, style_dim))
            self.to_rgbs.append(ToRGB(cout, style_dim))
            cin = cout

    def forward(self, latent: torch.Tensor, conditions: list[torch.Tensor], randomize_noise: bool) -> torch.Tensor:
        """``latent`` (B, num_layers + 1, style_dim) w codes; ``conditions`` [scale, shift] per resolution."""
        noise = [None] * self.num_layers if randomize_noise else [
            getattr(self.noises, f"noise{i}") for i in range(self.num_layers)]
        out = self.style_conv1(self.constant_input(latent.shape[0]), latent[:, 0], noise[0])
        skip = self.to_rgb1(out, latent[:, 1])
        i = 1
        for conv1, conv2, noise1, noise2, to_rgb in zip(self.style_convs[::2], self.style_convs[1::2], noise[1::2],
                                                        noise[2::2], self.to_rgbs):
            out = conv1(out, latent[:, i], noise1)
            if i < len(conditions):
                scale, shift = conditions[i - 1], conditions[i]
                if self.sft_half:
                    same, modulated = torch.split(out, out.shape[1] // 2, dim=1)
                    out = torch.cat([same, modulated * scale + shift], dim=1)
                else:
                    out = out * scale + shift
            out = conv2(out, latent[:, i + 1], noise2)
            skip = to_rgb(out, latent[:, i + 2], skip)
            i += 2
        return skip


class ResBlock(nn.Module):
    """conv-LReLU, bilinear x2 or x0.5, conv-LReLU, plus a resampled 1x1 skip."""

    def __init__(self, cin: int, cout: int, mode: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cin, 3, 1, 1)
        self.conv2 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.skip = nn.Conv2d(cin, cout, 1, bias=False)
        self.scale_factor = 0.5 if mode == "down" else 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.leaky_relu(self.conv1(x), LEAKY)
        out = F.interpolate(out, scale_factor=self.scale_factor, mode="bilinear", align_corners=False)
        out = F.leaky_relu(self.conv2(out), LEAKY)
        x = F.interpolate(x, scale_factor=self.scale_factor, mode="bilinear", align_corners=False)
        return out + self.skip(x)


class GFPGANv1Clean(nn.Module):
    """``forward(x)``: (B, 3, S, S) RGB faces in [-1, 1] -> (B, 3, S, S) restored faces in [-1, 1]. Defaults: the
    released v1.3/v1.4 configuration."""

    def __init__(self, out_size: int = 512, num_style_feat: int = 512, channel_multiplier: float = 2,
                 num_mlp: int = 8, input_is_latent: bool = True, different_w: bool = True, narrow: float = 1,
                 sft_half: bool = True) -> None:
        super().__init__()
        if out_size < 8 or out_size & (out_size - 1):
            raise ValueError(f"out_size must be a power of two >= 8, got {out_size}")
        self.input_is_latent, self.different_w = input_is_latent, different_w
        self.num_style_feat = num_style_feat
        self.out_size = out_size
        channels = _channels(narrow * 0.5, channel_multiplier)  # the U-Net is half as wide as the decoder
        self.log_size = int(math.log2(out_size))
        self.conv_body_first = nn.Conv2d(3, channels[out_size], 1)
        self.conv_body_down = nn.ModuleList()
        cin = channels[out_size]
        for level in range(self.log_size, 2, -1):
            self.conv_body_down.append(ResBlock(cin, channels[2 ** (level - 1)], "down"))
            cin = channels[2 ** (level - 1)]
        self.final_conv = nn.Conv2d(cin, channels[4], 3, 1, 1)
        self.conv_body_up = nn.ModuleList()
        self.toRGB = nn.ModuleList()
        self.condition_scale = nn.ModuleList()
        self.condition_shift = nn.ModuleList()
        cin = channels[4]
        for level in range(3, self.log_size + 1):
            cout = channels[2**level]
            self.conv_body_up.append(ResBlock(cin, cout, "up"))
            self.toRGB.append(nn.Conv2d(cout, 3, 1))
            sft = cout if sft_half else cout * 2
            for heads in (self.condition_scale, self.condition_shift):
                heads.append(nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1), nn.LeakyReLU(LEAKY),
                                           nn.Conv2d(cout, sft, 3, 1, 1)))
            cin = cout
        latents = (self.log_size * 2 - 2) if different_w else 1
        self.final_linear = nn.Linear(channels[4] * 16, latents * num_style_feat)
        self.stylegan_decoder = StyleGAN2Decoder(out_size, num_style_feat, num_mlp, channel_multiplier, narrow,
                                                 sft_half)

    def forward(self, x: torch.Tensor, randomize_noise: bool = False) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[-2:] != (self.out_size, self.out_size):
            raise ValueError(f"x must be (B, 3, {self.out_size}, {self.out_size}), got {tuple(x.shape)}")
        feat = F.leaky_relu(self.conv_body_first(x), LEAKY)
        skips = []
        for block in self.conv_body_down:
            feat = block(feat)
            skips.insert(0, feat)
        feat = F.leaky_relu(self.final_conv(feat), LEAKY)
        style = self.final_linear(feat.flatten(1))
        decoder = self.stylegan_decoder
        latent = style.view(style.shape[0], -1, self.num_style_feat) if self.different_w else style
        if not self.input_is_latent:
            latent = decoder.style_mlp(latent)  # applied to the code as it is, as GFPGAN does
        if not self.different_w:
            latent = latent[:, None].expand(-1, self.log_size * 2 - 2, -1)
        conditions = []
        for skip, up, scale, shift in zip(skips, self.conv_body_up, self.condition_scale, self.condition_shift):
            feat = up(feat + skip)
            conditions += [scale(feat), shift(feat)]
        return decoder(latent, conditions, randomize_noise)
