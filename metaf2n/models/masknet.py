"""MetaF2N's MaskNet: per-pixel weights for the face loss from (LR face, pseudo-HQ face).

The weight map ``W`` down-weights pixels where the face restorer's pseudo label is not
trustworthy: the inner-loop face loss is ``mean(W * |pseudo - SR|)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

OUTPUTS = ("relu", "sigmoid")
UPSAMPLINGS = ("torch", "tf1")


class MaskNet(nn.Module):
    """Eight 3x3 convs (6 -> 64 -> ... -> 64 -> 1), ReLU after the first seven.

    ``forward(lr_up, pseudo_hq)``: both (B,3,H,W) in [0, 1] (``lr_up`` is the bicubic-upsampled
    LR face, ``pseudo_hq`` the restorer's output) -> weights (B,1,H,W). ``output="relu"``
    (the official choice) gives W >= 0, unbounded; ``"sigmoid"`` gives W in (0, 1).

    ``upsample`` names how the LR face is brought to the pseudo label's size before it enters the network
    (:meth:`upsample_lr`): ``"torch"`` (bicubic, a = -0.75, half-pixel centres, clamped to [0, 1]) or ``"tf1"``
    (TensorFlow 1's ``resize_bicubic``, unclamped: what the official MetaF2N MaskNet was trained on).
    """

    def __init__(self, num_feat: int = 64, output: str = "relu", upsample: str = "torch") -> None:
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if upsample not in UPSAMPLINGS:
            raise ValueError(f"upsample must be one of {UPSAMPLINGS}, got {upsample!r}")
        self.upsample = upsample
        if not isinstance(num_feat, int) or num_feat < 1:
            raise ValueError(f"num_feat must be a positive int, got {num_feat!r}")
        self.output = output
        channels = [6] + [num_feat] * 7 + [1]
        for index in range(8):
            conv = nn.Conv2d(channels[index], channels[index + 1], kernel_size=3, stride=1, padding=1)
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            setattr(self, f"conv{index + 1}", conv)
        # Start near W = 1 (plain L1 on the pseudo label, the target of MetaF2N's (W - 1)^2
        # regulariser): with a ReLU output a random start can leave W = 0 and gradient-free.
        self.conv8.weight.data.mul_(0.01)
        nn.init.ones_(self.conv8.bias)

    def upsample_lr(self, face_lr: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The LR faces (B, 3, h, w) at ``size``, as this MaskNet expects them (see ``upsample``)."""
        if self.upsample == "tf1":
            from metaf2n.tf1_resize import resize_bicubic_tf1

            return resize_bicubic_tf1(face_lr, size)
        return F.interpolate(face_lr, size=size, mode="bicubic", align_corners=False).clamp(0, 1)

    def forward(self, lr_up: torch.Tensor, pseudo_hq: torch.Tensor) -> torch.Tensor:
        if lr_up.shape != pseudo_hq.shape or lr_up.dim() != 4 or lr_up.shape[1] != 3:
            raise ValueError(
                "lr_up and pseudo_hq must both have shape (B, 3, H, W), got "
                f"{tuple(lr_up.shape)} and {tuple(pseudo_hq.shape)}"
            )
        x = torch.cat([lr_up, pseudo_hq], dim=1)
        for index in range(1, 8):
            x = torch.relu(getattr(self, f"conv{index}")(x))
        logits = self.conv8(x)
        return torch.relu(logits) if self.output == "relu" else torch.sigmoid(logits)
