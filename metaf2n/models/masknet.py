"""MetaF2N's MaskNet: per-pixel weights for the face loss from (LR face, pseudo-HQ face).

The weight map ``W`` down-weights pixels where the face restorer's pseudo label is not
trustworthy: the inner-loop face loss is ``mean(W * |pseudo - SR|)``.
"""

from __future__ import annotations

import torch
from torch import nn

OUTPUTS = ("relu", "sigmoid")


class MaskNet(nn.Module):
    """Eight 3x3 convs (6 -> 64 -> ... -> 64 -> 1), ReLU after the first seven.

    ``forward(lr_up, pseudo_hq)``: both (B,3,H,W) in [0, 1] (``lr_up`` is the bicubic-upsampled
    LR face, ``pseudo_hq`` the restorer's output) -> weights (B,1,H,W). ``output="relu"``
    (the official choice) gives W >= 0, unbounded; ``"sigmoid"`` gives W in (0, 1).
    """

    def __init__(self, num_feat: int = 64, output: str = "relu") -> None:
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
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
