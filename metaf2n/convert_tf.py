"""The official MetaF2N TensorFlow checkpoint -> a metaf2n checkpoint (RRDBNet + MaskNet), without TensorFlow.

The official code (yinzhicun/MetaF2N) names its variables:

* SR network, scope ``MODEL``: ``conv_first``, ``body/{i}/rdb{j}/conv{k}``, ``conv_body``, ``conv_up1``,
  ``conv_up2``, ``conv_hr``, ``conv_last``, each ``/weight`` (HWIO) and ``/bias``: Real-ESRGAN's RRDBNet, whose
  names ours follow with dots (``body.{i}.rdb{j}.conv{k}``);
* MaskNet, scope ``Mask``: ``conv{1..8}/kernel`` (HWIO) and ``/bias``, 6 -> F -> ... -> F -> 1.

Kernels become OIHW. The sizes (features, blocks, growth channels, MaskNet width) are read from the shapes. A
training checkpoint's optimiser slots (``.../Adam``, ``.../Adam_1``) and variables outside the two scopes
(discriminator, step counters) are ignored and counted; a missing SR/MaskNet variable, an unexpected one inside the
two scopes, or a shape that does not fit is refused by name.

The written checkpoint (``sr``, ``masknet``, ``config``) loads with :func:`metaf2n.inference.load_model` and
``python -m metaf2n.train --init``. Its config records ``masknet_upsample: tf1``: the official MaskNet was trained on
TensorFlow 1's ``resize_bicubic`` of the LQ face, so it is fed that (:mod:`metaf2n.tf1_resize`) wherever it runs.
The inner learning rate is the official test's 0.01.
"""

from __future__ import annotations

import logging
import os
import re

import numpy as np
import torch

from metaf2n.models import MaskNet, RRDBNet
from metaf2n.tf_checkpoint import CheckpointError, read_checkpoint

logger = logging.getLogger(__name__)

CONVERTED_FORMAT = "metaf2n-converted-tf-1"
OFFICIAL_INNER_LR = 0.01
SLOT_SUFFIXES = ("/Adam", "/Adam_1", "/Momentum", "/RMSProp", "/RMSProp_1")
SR_NAME = re.compile(r"^MODEL/(conv_first|conv_body|conv_up1|conv_up2|conv_hr|conv_last|body/\d+/rdb[123]/conv[1-5])"
                     r"/(weight|bias)$")
MASK_NAME = re.compile(r"^Mask/conv([1-8])/(kernel|bias)$")


def _oihw(kernel: np.ndarray, name: str) -> torch.Tensor:
    if kernel.ndim != 4:
        raise CheckpointError(f"{name}: a kernel of shape {kernel.shape}, expected (kh, kw, in, out)")
    return torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))).float()


def split_variables(tensors: dict[str, np.ndarray]) -> tuple[dict, dict, list[str]]:
    """(SR tensors by our name, MaskNet tensors by our name, ignored names)."""
    sr, mask, ignored = {}, {}, []
    for name, value in tensors.items():
        if name.endswith(SLOT_SUFFIXES) or not name.startswith(("MODEL/", "Mask/")):
            ignored.append(name)
            continue
        if match := SR_NAME.match(name):
            layer, kind = match.groups()
            ours = f"{layer.replace('/', '.')}.{kind}"
            sr[ours] = _oihw(value, name) if kind == "weight" else torch.from_numpy(value.copy()).float()
        elif match := MASK_NAME.match(name):
            index, kind = match.groups()
            key = f"conv{index}.{'weight' if kind == 'kernel' else 'bias'}"
            mask[key] = _oihw(value, name) if kind == "kernel" else torch.from_numpy(value.copy()).float()
        else:
            raise CheckpointError(f"{name}: not a variable of MetaF2N's RRDBNet or MaskNet")
    return sr, mask, ignored


def _load_strict(model: torch.nn.Module, state: dict, what: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"the checkpoint lacks {len(missing)} {what} variable(s): {', '.join(missing[:5])}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise CheckpointError(f"the checkpoint has {len(extra)} {what} variable(s) this {what} does not: "
                              f"{', '.join(extra[:5])}")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(f"{what} {key}: shape {tuple(value.shape)} does not fit "
                                  f"{tuple(expected[key].shape)}")
    model.load_state_dict(state, strict=True)


def convert_official(prefix: str | os.PathLike) -> dict:
    """The metaf2n checkpoint dict for the official TensorFlow checkpoint ``prefix``."""
    tensors = read_checkpoint(prefix)
    sr_state, mask_state, ignored = split_variables(tensors)
    if "conv_first.weight" not in sr_state or "conv1.weight" not in mask_state:
        raise CheckpointError(f"{os.fspath(prefix)}: no MODEL/conv_first/weight or Mask/conv1/kernel: not a MetaF2N "
                              "checkpoint")
    blocks = {int(k.split(".")[1]) for k in sr_state if k.startswith("body.")}
    num_block = max(blocks) + 1 if blocks else 0
    if blocks != set(range(num_block)):
        missing = sorted(set(range(num_block)) - blocks)
        raise CheckpointError(f"{os.fspath(prefix)}: RRDB blocks {missing} are missing (MODEL/body/{missing[0]}/...)")
    num_feat = sr_state["conv_first.weight"].shape[0]
    grow = sr_state["body.0.rdb1.conv1.weight"].shape[0] if num_block else 32
    mask_feat = mask_state["conv1.weight"].shape[0]
    sr = RRDBNet(num_feat=num_feat, num_block=num_block, num_grow_ch=grow)
    masknet = MaskNet(num_feat=mask_feat, upsample="tf1")
    _load_strict(sr, sr_state, "RRDBNet")
    _load_strict(masknet, mask_state, "MaskNet")
    if ignored:
        logger.info("ignored %d variables outside MetaF2N's SR and MaskNet (optimiser slots, discriminator, "
                    "counters), e.g. %s", len(ignored), ", ".join(sorted(ignored)[:3]))
    config = {"num_feat": num_feat, "num_block": num_block, "num_grow_ch": grow, "masknet_feat": mask_feat,
              "masknet_upsample": "tf1", "inner_lr": OFFICIAL_INNER_LR}
    return {"format": CONVERTED_FORMAT, "sr": sr.state_dict(), "masknet": masknet.state_dict(), "config": config,
            "source": f"official MetaF2N TensorFlow checkpoint {os.fspath(prefix)}", "ignored": sorted(ignored)}
