"""The training run's configuration: one flat dataclass, presets, YAML files and command-line flags.

Precedence (later wins): the dataclass defaults < the preset (``--preset``, default ``demo``) < the YAML file
(``--config``) < flags given on the command line. Every field is a flag of the same name with dashes
(``w_ssl`` -> ``--w-ssl``). On ``--resume`` the checkpoint's config replaces the first three layers.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, fields

import yaml

from metaf2n.checks import parse_value_range, require_choice, require_int, require_number
from metaf2n.maml import MetaConfig
from metaf2n.models.masknet import UPSAMPLINGS
from metaf2n.precision import PRECISIONS

# The model and data sizes of each preset (see the README for what they are for).
PRESETS: dict[str, dict] = {
    # About 0.35 s per meta-step on 2 CPU cores: a narrow 2-block RRDBNet, 16 -> 64 px patches, 2 tasks of 2 + 2
    # patches, an L1 warm-up from scratch. SSL is weighted 0.1 here: on 64 px patches of a net this small the SSL
    # term (3-5 at KL/L1 weights 1000) outweighs the image L1 (~0.1) forty-fold and pulls PSNR down (README).
    "demo": dict(
        num_feat=16, num_block=2, num_grow_ch=16, masknet_feat=16, d_num_feat=16,
        tasks=2, face_patches=2, background_patches=2,
        face_patch_size=64, face_size=128, background_patch_size=64, background_crop_size=128,
        steps=300, warmup_steps=100, warmup_lr=1e-3, lr_g=1e-4, w_ssl=0.1, val_every=25, ckpt_every=100,
        val_tasks=4, out="runs/demo",
    ),
    # The official MetaF2N sizes: Real-ESRGAN x4plus (23 RRDBs), faces 32 -> 128, backgrounds 64 -> 256,
    # meta-batch 4 tasks of 4 faces + 4 backgrounds.
    "paper": dict(
        num_feat=64, num_block=23, num_grow_ch=32, masknet_feat=64, d_num_feat=64,
        tasks=4, face_patches=4, background_patches=4,
        face_patch_size=128, face_size=512, background_patch_size=256, background_crop_size=400,
        steps=100_000, warmup_steps=0, lr_g=3e-5, val_every=1000, ckpt_every=5000, val_tasks=4,
        out="runs/paper",
    ),
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class TrainConfig(MetaConfig):
    """Everything a run needs; :class:`~metaf2n.maml.MetaConfig`'s fields are the meta-objective's."""

    preset: str = "demo"
    # data
    faces: str | None = None
    backgrounds: str | None = None
    restorer: str | None = None
    restorer_range: str = "0,1"
    tasks: int = 4
    face_patches: int = 4
    background_patches: int = 4
    face_patch_size: int = 128
    face_size: int = 512
    background_patch_size: int = 256
    background_crop_size: int = 400
    # networks
    num_feat: int = 64
    num_block: int = 23
    num_grow_ch: int = 32
    masknet_feat: int = 64
    masknet_upsample: str = "torch"
    d_num_feat: int = 64
    init: str | None = None
    init_sr: str | None = None
    init_d: str | None = None
    lpips_weights: str | None = None
    # optimisation
    lr_g: float = 3e-5
    lr_d: float = 1e-4
    warmup_steps: int = 0
    warmup_lr: float = 2e-4
    ema_decay: float = 0.0
    precision: str = "fp32"
    # the run
    steps: int = 1000
    out: str = "runs/metaf2n"
    device: str = "auto"
    seed: int = 0
    ckpt_every: int = 500
    val_every: int = 100
    val_tasks: int = 4
    max_skips: int = 10

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
            self._check()
        except ValueError as error:
            message = str(error)
            name = message.split(" ", 1)[0]
            if name in {f.name for f in fields(self)}:
                message = flag(name) + message[len(name):]
            raise ValueError(message) from None

    def _check(self) -> None:
        require_choice("preset", self.preset, tuple(PRESETS))
        require_choice("precision", self.precision, PRECISIONS)
        require_choice("masknet_upsample", self.masknet_upsample, UPSAMPLINGS)
        if self.init and self.init_sr:
            raise ValueError("init and --init-sr both set the SR weights: give one of them")
        positive = ("tasks", "face_patches", "background_patches", "face_patch_size", "face_size",
                    "background_patch_size", "background_crop_size", "num_feat", "num_grow_ch", "masknet_feat",
                    "d_num_feat", "steps", "ckpt_every", "val_every", "val_tasks", "max_skips")
        for name in positive:
            require_int(name, getattr(self, name), 1)
        for name in ("num_block", "warmup_steps", "seed"):
            require_int(name, getattr(self, name), 0)
        for name in ("lr_g", "lr_d", "warmup_lr"):
            require_number(name, getattr(self, name), strict=True)
        require_number("ema_decay", self.ema_decay)
        if self.ema_decay >= 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if self.background_patch_size % 8:  # the U-Net discriminator halves the SR background three times
            raise ValueError(f"background_patch_size must be a multiple of 8, got {self.background_patch_size}")
        self.restorer_value_range()

    def restorer_value_range(self) -> tuple[float, float]:
        return parse_value_range(self.restorer_range)

    def meta(self) -> MetaConfig:
        return MetaConfig(**{f.name: getattr(self, f.name) for f in fields(MetaConfig)})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _field_type(f: dataclasses.Field) -> type:
    hint = typing.get_type_hints(TrainConfig)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _coerce(name: str, value, kind: type):
    if value is None or isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"{flag(name)} must be a {kind.__name__}, got {value!r}")


def load_yaml(path: str | os.PathLike) -> dict:
    """The fields set by a YAML config file (keys with underscores or dashes)."""
    try:
        with open(path, encoding="utf-8") as file:
            data = yaml.safe_load(file) or {}
    except OSError as error:
        raise ValueError(f"--config {os.fspath(path)!r} cannot be read: {error.strerror}") from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise ValueError(f"--config {os.fspath(path)!r} is not valid YAML{line}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {os.fspath(path)!r} must hold a mapping of field names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def make_config(base: dict, overrides: dict) -> TrainConfig:
    """A TrainConfig from ``base`` updated by ``overrides``; unknown names and wrong types raise ValueError."""
    known = {f.name: f for f in fields(TrainConfig)}
    merged = dict(base)
    for name, value in overrides.items():
        if name not in known:
            raise ValueError(f"unknown config field {name!r} ({flag(name)})")
        merged[name] = _coerce(name, value, _field_type(known[name]))
    return TrainConfig(**merged)


ARCHITECTURE = ("num_feat", "num_block", "num_grow_ch", "masknet_feat", "masknet_upsample")


def resolve(cli: dict, checkpoint_config: dict | None = None, init_config: dict | None = None) -> TrainConfig:
    """The effective config from explicitly given flags ``cli`` (plus ``config``, a YAML path) or, on resume, from
    the checkpoint's config updated by those flags. ``init_config`` (the config of an ``--init`` checkpoint) gives
    the networks' sizes and MaskNet's input over the preset's; a YAML file and flags still win."""
    cli = dict(cli)
    yaml_path = cli.pop("config", None)
    file_values = load_yaml(yaml_path) if yaml_path else {}
    if checkpoint_config is not None:
        return make_config({}, {**checkpoint_config, **file_values, **cli})
    preset = cli.get("preset", file_values.get("preset", "demo"))
    if preset not in PRESETS:
        raise ValueError(f"--preset must be one of {tuple(PRESETS)}, got {preset!r}")
    architecture = {k: init_config[k] for k in ARCHITECTURE if k in (init_config or {})}
    return make_config({}, {**PRESETS[preset], **architecture, "preset": preset, **file_values, **cli})


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per field, defaults suppressed so that only flags actually given reach :func:`resolve`."""
    for f in fields(TrainConfig):
        kind = _field_type(f)
        default = f.default
        if kind is bool:
            parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS)
        else:
            parser.add_argument(flag(f.name), type=kind, default=argparse.SUPPRESS, metavar=kind.__name__.upper(),
                                help=f"(default {default!r}, or the preset's)")


def dump_yaml(config: TrainConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
