"""Fast RRDBNet inference on the CPU: 3x3 convolutions by Winograd F(4x4, 3x3) (``torch.ops.metaf2n.winograd_conv3x3_``).

A 3x3 convolution computes each 4x4 output tile from a 6x6 input patch with 36 multiplications per input/output
channel pair instead of 144, the algorithm the ncnn runtime uses for Real-ESRGAN on the CPU. The kernel also fuses
what surrounds the convolutions of an RRDBNet: the bias, LeakyReLU, the residual additions, the nearest x2
upsampling of the input, and the dense blocks' concatenations (each conv writes its growth channels into a channel
slice of one preallocated channels_last buffer, which the next conv reads). Inference only: no autograd.

The weight transform ``U = G g G^T`` is computed here in float64 and stored in float32.
"""

from __future__ import annotations

import torch
from torch import nn

from . import ops  # noqa: F401  (loads metaf2n._C, which registers the op)
from .models.rrdbnet import LEAKY_SLOPE, RESIDUAL_SCALE, RRDBNet

__all__ = ["WinogradRRDBNet", "conv3x3", "default_isa", "preferred", "supports", "transform_weight"]

# F(4, 3) with interpolation points 0, 1, -1, 2, -2 and infinity: the kernel transform G (6 x 3).
_G = (
    (1 / 4, 0.0, 0.0),
    (-1 / 6, -1 / 6, -1 / 6),
    (-1 / 6, 1 / 6, -1 / 6),
    (1 / 24, 1 / 12, 1 / 6),
    (1 / 24, -1 / 12, 1 / 6),
    (0.0, 0.0, 1.0),
)
LANES = 16  # channel counts must be multiples of this
ISAS = ("auto", "avx512", "avx2", "generic")


def default_isa() -> str:
    """The kernel the op runs by default: ``"avx512"``, ``"avx2"`` or ``"generic"`` (capped by ATEN_CPU_CAPABILITY)."""
    return str(torch.ops.metaf2n.winograd_default_isa())


def transform_weight(weight: torch.Tensor) -> torch.Tensor:
    """(out, in, 3, 3) convolution weights -> the (36, in, out) float32 Winograd weights ``G g G^T``."""
    if weight.dim() != 4 or weight.shape[2:] != (3, 3):
        raise ValueError(f"weight must be (out, in, 3, 3), got {tuple(weight.shape)}")
    g = torch.tensor(_G, dtype=torch.float64)
    u = torch.einsum("ak,oikl,bl->abio", g, weight.detach().to("cpu", torch.float64), g)
    return u.reshape(36, weight.shape[1], weight.shape[0]).to(torch.float32).contiguous()


def conv3x3(
    x: torch.Tensor,
    weights: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    upsample: int = 1,
    negative_slope: float | None = None,
    residual: torch.Tensor | None = None,
    residual_scale: float = 1.0,
    residual2: torch.Tensor | None = None,
    residual2_scale: float = 1.0,
    out: torch.Tensor | None = None,
    isa: str = "auto",
) -> torch.Tensor:
    """``residual + residual_scale * act(conv3x3(up(x)) + bias)`` for channels_last float32 CPU tensors, and then, with
    ``residual2``, ``residual2 + residual2_scale * that``.

    ``weights`` come from :func:`transform_weight`; ``up`` is nearest upsampling by ``upsample`` (1 or 2); ``act`` is
    LeakyReLU(``negative_slope``), none when it is None. Writes into ``out`` when given (it may be a channel slice of a
    channels_last tensor) and returns it.
    """
    if out is None:
        n, _, h, w = x.shape
        out = torch.empty(n, weights.shape[2], h * upsample, w * upsample, dtype=torch.float32,
                          memory_format=torch.channels_last)
    torch.ops.metaf2n.winograd_conv3x3_(out, x, weights, bias, upsample, negative_slope, residual, residual_scale,
                                        residual2, residual2_scale, isa)
    return out


@torch.library.register_fake("metaf2n::winograd_conv3x3_")
def _(output, input, weights, bias, upsample=1, negative_slope=None, residual1=None, scale1=1.0, residual2=None,
      scale2=1.0, isa="auto"):
    return None


def preferred(model: nn.Module, device: torch.device, precision: str = "fp32") -> bool:
    """Whether ``engine="auto"`` runs ``model`` with Winograd: an RRDBNet it supports, float32 on a CPU with AVX2
    or AVX-512 (the generic kernel is not faster than oneDNN's direct convolution)."""
    return torch.device(device).type == "cpu" and precision == "fp32" and supports(model) and \
        default_isa() in ("avx512", "avx2")


def supports(model: nn.Module) -> bool:
    """Whether :class:`WinogradRRDBNet` can run ``model``: an RRDBNet whose channel counts are multiples of 16."""
    if type(model) is not RRDBNet:
        return False
    rdb = model.body[0].rdb1 if len(model.body) else None
    feat = model.conv_first.out_channels
    grow = rdb.conv1.out_channels if rdb is not None else LANES
    return feat % LANES == 0 and grow % LANES == 0


class WinogradRRDBNet(nn.Module):
    """An RRDBNet's forward pass with Winograd convolutions, for float32 inference on the CPU.

    Built from an :class:`~metaf2n.models.rrdbnet.RRDBNet` and, optionally, ``params`` that replace some of its
    parameters by name (the adapted weights of :func:`metaf2n.inference.adapt_to_faces`). The weights are transformed
    once; rebuild after changing them. The same function as the RRDBNet to float32 rounding: the tests hold x4plus to
    1e-4 of the direct convolution on [0, 1] outputs. Input (B, C, h, w) float32 on the CPU; output (B, C, 4h, 4w).
    """

    def __init__(self, model: RRDBNet, params: dict[str, torch.Tensor] | None = None, isa: str = "auto") -> None:
        super().__init__()
        if not supports(model):
            raise ValueError("model must be an RRDBNet whose num_feat and num_grow_ch are multiples of 16")
        if isa not in ISAS:
            raise ValueError(f"isa must be one of {ISAS}, got {isa!r}")
        named = dict(model.named_parameters())
        unknown = sorted(set(params or {}) - set(named))
        if unknown:
            raise ValueError(f"params names no parameter of the model: {unknown[:3]}")
        named.update(params or {})

        def conv(name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
            bias = named.get(f"{name}.bias")
            bias = None if bias is None else bias.detach().to("cpu", torch.float32).contiguous()
            return transform_weight(named[f"{name}.weight"]), bias

        self.isa = isa
        self.num_feat = model.conv_first.out_channels
        self.grow = model.body[0].rdb1.conv1.out_channels if len(model.body) else LANES
        self.conv_first = _thin_conv(model.conv_first, named, "conv_first")
        self.conv_last = _thin_conv(model.conv_last, named, "conv_last")
        self.blocks = [[[conv(f"body.{i}.rdb{r}.conv{k}") for k in range(1, 6)] for r in range(1, 4)]
                       for i in range(len(model.body))]
        self.conv_body, self.conv_up1, self.conv_up2, self.conv_hr = (
            conv(name) for name in ("conv_body", "conv_up1", "conv_up2", "conv_hr"))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reconstruct(self.features(x))

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """conv_first, the RRDBs and conv_body with the trunk's skip: (B, C, h, w) -> (B, num_feat, h, w)."""
        if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 4:
            raise ValueError(f"x must be a (B, C, h, w) float32 CPU tensor, got {tuple(x.shape)} {x.dtype} on "
                             f"{x.device}")
        isa, nf, gc = self.isa, self.num_feat, self.grow
        n, _, h, w = x.shape
        trunk = self.conv_first(x.contiguous(memory_format=torch.channels_last))
        # Three dense buffers: each holds a dense block's input in its first nf channels and its four growth
        # outputs after them. An RRDB reads its input from one and ends in another; the third holds the middle.
        buffers = [torch.empty(n, nf + 4 * gc, h, w, memory_format=torch.channels_last) for _ in range(3)]
        buffers[0][:, :nf] = trunk
        current = 0
        for rrdb in self.blocks:
            first, second = [i for i in range(3) if i != current]
            x_in = buffers[current][:, :nf]
            stages = ((current, second), (second, first), (first, second))
            for index, (convs, (src, dst)) in enumerate(zip(rrdb, stages)):
                buffer = buffers[src]
                for k, (weights, bias) in enumerate(convs[:4]):
                    lo = nf + k * gc
                    conv3x3(buffer[:, :lo], weights, bias, negative_slope=LEAKY_SLOPE, out=buffer[:, lo:lo + gc],
                            isa=isa)
                last = index == 2  # the dense block's skip, and for the last one the RRDB's skip around it
                conv3x3(buffer, *convs[4], residual=buffer[:, :nf], residual_scale=RESIDUAL_SCALE,
                        residual2=x_in if last else None, residual2_scale=RESIDUAL_SCALE, out=buffers[dst][:, :nf],
                        isa=isa)
            current = second
        return conv3x3(buffers[current][:, :nf], *self.conv_body, residual=trunk, isa=isa)

    @torch.no_grad()
    def reconstruct(self, feat: torch.Tensor, stages: tuple[str, ...] = ("x2", "x4", "tail")) -> torch.Tensor:
        """The two nearest x2 + conv stages, conv_hr and conv_last: (B, num_feat, h, w) -> (B, C, 4h, 4w).
        ``stages`` limits it to some of "x2", "x4", "tail", in that order (for profiling)."""
        if "x2" in stages:
            feat = conv3x3(feat, *self.conv_up1, upsample=2, negative_slope=LEAKY_SLOPE, isa=self.isa)
        if "x4" in stages:
            feat = conv3x3(feat, *self.conv_up2, upsample=2, negative_slope=LEAKY_SLOPE, isa=self.isa)
        if "tail" in stages:
            feat = self.conv_last(conv3x3(feat, *self.conv_hr, negative_slope=LEAKY_SLOPE, isa=self.isa)).contiguous()
        return feat


def _thin_conv(conv: nn.Conv2d, named: dict[str, torch.Tensor], name: str) -> nn.Conv2d:
    """A float32 CPU copy of ``conv`` with the weights in ``named``, in channels_last (oneDNN's fastest layout for
    the first and last convs, whose 3-channel side the Winograd kernel does not take)."""
    copy = nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=1, bias=conv.bias is not None)
    state = {key: named[f"{name}.{key}"].detach() for key in copy.state_dict()}
    copy.load_state_dict(state)
    return copy.float().requires_grad_(False).to(memory_format=torch.channels_last)
