"""Reading a TensorFlow checkpoint (the "tensor bundle" V2 format) without TensorFlow.

A checkpoint ``PREFIX`` is two kinds of file:

* ``PREFIX.index``: a LevelDB-style table, sorted by key. Its last 48 bytes are the footer: two block handles
  (metaindex, index; each a varint64 offset and size), zero padding, and the magic 0xdb4775248b80fb57. Every block
  is followed by a 1-byte compression type (0: none) and the masked crc32c of the block and that byte. A block holds
  prefix-compressed entries (varint32 shared, non-shared and value lengths, the key's new bytes, the value) and ends
  with its restart offsets (uint32 each) and their count. The index block's values are handles of the data blocks.
  The entry with the empty key is the bundle header (``BundleHeaderProto``: number of shards, endianness); every
  other entry is a tensor's ``BundleEntryProto``: dtype (1), shape (2), shard (3), offset (4), size (5), masked
  crc32c of its bytes (6), slices (7).
* ``PREFIX.data-SSSSS-of-NNNNN``: the tensors' raw little-endian bytes at their offsets.

Only what a checkpoint of plain float variables needs is read: numeric dtypes, one or more shards, no partitioned
(sliced) variables, uncompressed index blocks. Every tensor's crc32c is checked.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
BLOCK_TRAILER_SIZE = 5
MASK_DELTA = 0xA282EAD8
DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 5: np.int16, 6: np.int8, 9: np.int64,
          10: np.bool_, 17: np.uint16, 19: np.float16, 22: np.uint32, 23: np.uint64}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the file and what is wrong."""


def crc32c(data: bytes) -> int:
    import google_crc32c

    return google_crc32c.value(data)


def unmask(masked: int) -> int:
    rotated = (masked - MASK_DELTA) & 0xFFFFFFFF
    return ((rotated >> 17) | (rotated << 15)) & 0xFFFFFFFF


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise CheckpointError("a varint runs past the end of its buffer")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise CheckpointError("a varint is longer than 10 bytes")


def parse_proto(data: bytes) -> dict[int, list]:
    """A protobuf message's fields by number: varints as ints, length-delimited fields as bytes, fixed32/64 as
    ints. Repeated fields keep every value in order."""
    fields: dict[int, list] = {}
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = int.from_bytes(data[pos : pos + 8], "little"), pos + 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = int.from_bytes(data[pos : pos + 4], "little"), pos + 4
        else:
            raise CheckpointError(f"unsupported protobuf wire type {wire} in field {number}")
        if pos > len(data):
            raise CheckpointError(f"protobuf field {number} runs past the end of its message")
        fields.setdefault(number, []).append(value)
    return fields


def _block(index: bytes, offset: int, size: int, source: str) -> bytes:
    end = offset + size + BLOCK_TRAILER_SIZE
    if offset < 0 or end > len(index):
        raise CheckpointError(f"{source}: a block at {offset} runs past the end of the file (truncated?)")
    contents, kind = index[offset : offset + size], index[offset + size]
    stored = int.from_bytes(index[offset + size + 1 : end], "little")
    if unmask(stored) != crc32c(contents + bytes([kind])):
        raise CheckpointError(f"{source}: the block at offset {offset} fails its crc32c (corrupt file)")
    if kind != 0:
        raise CheckpointError(f"{source}: block compression type {kind} is not supported (only uncompressed)")
    return contents


def _entries(block: bytes, source: str):
    if len(block) < 4:
        raise CheckpointError(f"{source}: a block of {len(block)} bytes has no restart count")
    restarts = int.from_bytes(block[-4:], "little")
    end = len(block) - 4 - 4 * restarts
    if end < 0:
        raise CheckpointError(f"{source}: a block's restart array is larger than the block")
    pos, key = 0, b""
    while pos < end:
        shared, pos = _varint(block, pos)
        fresh, pos = _varint(block, pos)
        length, pos = _varint(block, pos)
        if shared > len(key) or pos + fresh + length > end:
            raise CheckpointError(f"{source}: a malformed entry in a block")
        key = key[:shared] + block[pos : pos + fresh]
        pos += fresh
        yield key, block[pos : pos + length]
        pos += length


def read_index(path: str | os.PathLike) -> dict[str, bytes]:
    """All entries of a checkpoint's ``.index`` table: {key: value bytes}."""
    source = os.fspath(path)
    data = Path(path).read_bytes()
    if len(data) < FOOTER_SIZE or int.from_bytes(data[-8:], "little") != TABLE_MAGIC:
        raise CheckpointError(f"{source}: not a TensorFlow checkpoint index (no table magic at its end)")
    footer = data[-FOOTER_SIZE:]
    _, pos = _varint(footer, 0)
    _, pos = _varint(footer, pos)
    index_offset, pos = _varint(footer, pos)
    index_size, pos = _varint(footer, pos)
    entries = {}
    for _, handle in _entries(_block(data, index_offset, index_size, source), source):
        offset, pos = _varint(handle, 0)
        size, _ = _varint(handle, pos)
        for key, value in _entries(_block(data, offset, size, source), source):
            entries[key.decode("utf-8", "replace")] = value
    return entries


def _shape(proto: bytes) -> tuple[int, ...]:
    fields = parse_proto(proto)
    if fields.get(3, [0])[0]:
        raise CheckpointError("a tensor of unknown rank")
    return tuple(parse_proto(dim).get(1, [0])[0] for dim in fields.get(2, []))


def read_checkpoint(prefix: str | os.PathLike) -> dict[str, np.ndarray]:
    """{variable name: array} of every tensor in the checkpoint ``prefix`` (``prefix.index`` +
    ``prefix.data-*``), each checked against its crc32c. Raises :class:`CheckpointError` naming the file or the
    variable and what is wrong."""
    prefix = os.fspath(prefix)
    index_path = prefix + ".index"
    if not os.path.isfile(index_path):
        raise CheckpointError(f"{index_path} does not exist (give the checkpoint prefix, e.g. "
                              "pretrained_models/model-new, not a file name)")
    entries = read_index(index_path)
    header = parse_proto(entries.pop("", b""))
    shards = header.get(1, [1])[0]
    if header.get(2, [0])[0] != 0:
        raise CheckpointError(f"{index_path}: a big-endian checkpoint is not supported")
    data = {}
    for shard in range(shards):
        path = f"{prefix}.data-{shard:05d}-of-{shards:05d}"
        if not os.path.isfile(path):
            raise CheckpointError(f"{path} is missing (the index names {shards} data shard(s))")
        data[shard] = Path(path).read_bytes()
    tensors = {}
    for name, value in sorted(entries.items()):
        entry = parse_proto(value)
        if 7 in entry:
            raise CheckpointError(f"{name}: a partitioned (sliced) variable is not supported")
        dtype_code = entry.get(1, [0])[0]
        if dtype_code not in DTYPES:
            raise CheckpointError(f"{name}: dtype code {dtype_code} is not supported")
        dtype = np.dtype(DTYPES[dtype_code]).newbyteorder("<")
        shape = _shape(entry.get(2, [b""])[0])
        shard, offset, size = entry.get(3, [0])[0], entry.get(4, [0])[0], entry.get(5, [0])[0]
        if shard not in data:
            raise CheckpointError(f"{name}: in shard {shard}, but the checkpoint has {shards}")
        blob = data[shard][offset : offset + size]
        if len(blob) != size:
            raise CheckpointError(f"{name}: its {size} bytes at offset {offset} run past the end of "
                                  f"{prefix}.data-{shard:05d}-of-{shards:05d} (truncated?)")
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if size != expected:
            raise CheckpointError(f"{name}: {size} bytes for shape {shape} of {dtype.name} ({expected} expected)")
        if 6 in entry and unmask(entry[6][0]) != crc32c(blob):
            raise CheckpointError(f"{name}: its bytes fail the crc32c recorded in the index (corrupt data file)")
        tensors[name] = np.frombuffer(blob, dtype).reshape(shape).copy()
    return tensors
