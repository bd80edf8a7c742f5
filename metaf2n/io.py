"""Atomic file writes: a crash never leaves a half-written checkpoint, log or image behind.

Every writer goes to a temporary file in the target's folder, flushes and fsyncs it, then renames it over the target
(``os.replace`` is atomic on POSIX and Windows within one file system).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

import torch


TEMP_SUFFIX = ".tmp"


def temp_prefix(target: Path) -> str:
    """The name prefix of ``target``'s temporary files: ``.NAME.`` (they end in ``.tmp``)."""
    return f".{target.name}."


def is_temp_file(path: Path) -> bool:
    """Whether ``path`` is named like a temporary file of :func:`atomic_write` (an interrupted write leaves one)."""
    return path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(file)`` on a temporary binary file beside ``path``, fsync it, rename it to ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=temp_prefix(target), suffix=TEMP_SUFFIX, dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temp, 0o644)
        os.replace(temp, target)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise
    return target


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda file: file.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(path: str | os.PathLike, obj: object) -> Path:
    """``torch.save`` through :func:`atomic_write`; serialised in memory first so a failing pickle writes nothing."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line with a single write, flushed and fsynced (a crash loses at most that line)."""
    line = json.dumps(record, sort_keys=False) + "\n"
    with open(path, "a", encoding="utf-8") as file:
        file.write(line)
        file.flush()
        os.fsync(file.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines file; a torn last line (from a crash mid-write) is ignored."""
    records = []
    with open(path, encoding="utf-8") as file:
        for line in file:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


def load_torch_file(path: str | os.PathLike, what: str = "checkpoint") -> object:
    """``torch.load(path, weights_only=True)`` on the CPU, with one-line errors: ValueError naming ``path`` and
    whether it is missing, a folder, empty or truncated, not a torch file, or an unsafe pickle (never executed)."""
    import pickle

    name = os.fspath(path)
    if not os.path.exists(name):
        raise ValueError(f"{what} {name!r} does not exist")
    if os.path.isdir(name):
        raise ValueError(f"{what} {name!r} is a folder, not a file")
    if os.path.getsize(name) == 0:
        raise ValueError(f"{what} {name!r} is empty")
    try:
        return torch.load(name, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        import re

        found = re.search(r"(?:unsupported GLOBAL|Unsupported global:(?: GLOBAL)?) ([\w.]+)", str(error))
        if found:  # weights_only refused a callable or class: it was never run
            raise ValueError(f"{what} {name!r} is refused: an unsafe pickle (it would run {found.group(1)})") from None
        raise ValueError(f"{what} {name!r} cannot be read: not a torch file") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError, ImportError, IndexError,
            TypeError, UnicodeDecodeError) as error:
        text = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
        raise ValueError(f"{what} {name!r} cannot be read: truncated, corrupt or not a torch file ({text})") from None
