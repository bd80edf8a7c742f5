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


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(file)`` on a temporary binary file beside ``path``, fsync it, rename it to ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
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
