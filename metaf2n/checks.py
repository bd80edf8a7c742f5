"""Argument checks shared by the config dataclasses: each raises ValueError naming the field."""

from __future__ import annotations

import math
import os


def require_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def require_number(name: str, value, minimum: float = 0.0, strict: bool = False) -> None:
    """A finite int or float ``>= minimum`` (``> minimum`` when ``strict``)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or value < minimum or (strict and value == minimum):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {minimum}, got {value!r}")


def require_choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def join_range_flags(argv: list[str], flags: tuple[str, ...] = ("--restorer-range",)) -> list[str]:
    """``["--restorer-range", "-1,1"]`` -> ``["--restorer-range=-1,1"]``: argparse would take "-1,1" for a flag."""
    out: list[str] = []
    index = 0
    while index < len(argv):
        item = argv[index]
        if item in flags and index + 1 < len(argv) and argv[index + 1].startswith("-") and "," in argv[index + 1]:
            out.append(f"{item}={argv[index + 1]}")
            index += 2
            continue
        out.append(item)
        index += 1
    return out


def parse_value_range(text: str, name: str = "restorer_range") -> tuple[float, float]:
    """``"low,high"`` -> ``(low, high)`` with high > low; ValueError naming ``name`` otherwise."""
    try:
        low, high = (float(v) for v in str(text).split(","))
    except ValueError:
        raise ValueError(f"{name} must be 'low,high', e.g. '-1,1', got {text!r}") from None
    if not high > low:
        raise ValueError(f"{name} must have high > low, got {text!r}")
    return low, high


def check_folders(args, names: tuple[str, ...], paired: bool = True) -> None:
    """ValueError naming the flag when a given folder does not exist, or (``paired``) only one of them is given."""
    given = [getattr(args, name) is not None for name in names]
    flags = [f"--{name.replace('_', '-')}" for name in names]
    if paired and any(given) and not all(given):
        raise ValueError(f"{' and '.join(flags)} go together")
    for name, flag in zip(names, flags):
        folder = getattr(args, name)
        if folder is not None and not os.path.isdir(folder):
            raise ValueError(f"{flag} {folder!r} is not a folder")
