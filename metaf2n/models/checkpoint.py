"""Strict loading of published checkpoints (BasicSR / Real-ESRGAN layouts)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch
from torch import nn

logger = logging.getLogger(__name__)

PREFERRED_KEYS = ("params_ema", "params")
_MAX_LISTED = 20


def _format_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    more = len(keys) - _MAX_LISTED
    return shown + (f", ... ({more} more)" if more > 0 else "")


def extract_state_dict(checkpoint: Mapping, key: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict inside ``checkpoint``: ``checkpoint[key]`` if ``key`` is given, else
    ``params_ema``, else ``params``, else ``checkpoint`` itself; a leading ``module.`` is stripped."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"checkpoint must be a dict, got {type(checkpoint).__name__}")
    if key is not None:
        if key not in checkpoint:
            raise ValueError(f"key {key!r} not in checkpoint; available keys: {_format_keys(sorted(map(str, checkpoint)))}")
        state = checkpoint[key]
    else:
        state = next((checkpoint[k] for k in PREFERRED_KEYS if k in checkpoint), checkpoint)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(
            "checkpoint holds no state dict (expected 'params_ema', 'params', or a mapping of names to "
            f"tensors); top-level keys: {_format_keys(sorted(map(str, checkpoint)))}"
        )
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def load_pretrained(model: nn.Module, path: str | os.PathLike, key: str | None = None) -> nn.Module:
    """Load the checkpoint at ``path`` into ``model`` strictly and return ``model``.

    Accepted layouts: ``{"params_ema": sd, ...}`` (preferred), ``{"params": sd, ...}``, or a
    bare state dict; keys may carry a ``module.`` prefix. ``key`` forces one top-level key.
    Raises ValueError listing missing keys, unexpected keys and shape mismatches.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    from metaf2n.io import load_torch_file

    checkpoint = load_torch_file(path, "weights file")
    state = extract_state_dict(checkpoint, key)

    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing keys ({len(missing)}): {_format_keys(missing)}")
        if unexpected:
            problems.append(f"unexpected keys ({len(unexpected)}): {_format_keys(unexpected)}")
        if mismatched:
            problems.append(f"shape mismatches ({len(mismatched)}): {_format_keys(mismatched)}")
        raise ValueError(
            f"checkpoint {os.fspath(path)!r} does not match {type(model).__name__}: " + "; ".join(problems)
        )
    model.load_state_dict(state, strict=True)
    logger.info("loaded %d tensors into %s from %s", len(state), type(model).__name__, os.fspath(path))
    return model
