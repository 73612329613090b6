"""Read the metrics an offline W&B run wrote (its ``run-*.wandb`` file), for tests.

The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic, version), then 32 KiB blocks of
records (crc32 4 bytes, length 2 bytes, type 1 byte) whose payloads are ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

_BLOCK = 32768
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _payloads(data: bytes):
    pos, chunks = _HEADER, []
    while pos + 7 <= len(data):
        block_left = _BLOCK - (pos % _BLOCK)
        if block_left < 7:
            pos += block_left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += block_left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            chunks = [chunk]
        elif kind == _MIDDLE:
            chunks.append(chunk)
        elif kind == _LAST:
            chunks.append(chunk)
            yield b"".join(chunks)


def history(run_file: str | Path) -> list[dict[str, object]]:
    """The logged history rows of an offline run file, as dicts of key -> decoded JSON value."""
    rows = []
    for payload in _payloads(Path(run_file).read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows


def find_run_files(root: str | Path) -> list[Path]:
    """Every offline run file below ``root``."""
    return sorted(Path(root).rglob("offline-run-*/run-*.wandb"))
