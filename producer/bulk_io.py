"""Bulk files (producer side of `headrace bulk`): the streamed input and the resumable output.

The output is append-only JSONL written one whole line per write; opening it again
cuts a torn last line (a crash mid-write) and collects the ids already answered.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from producer.bulk_formats import SIMPLE, detect_format

log = logging.getLogger(__name__)

AUTO = "auto"
_DETECT_LINES = 1000  # lines looked at to find the first JSON object


class OutputFile:
    """Append-only JSONL output. Opening it cuts a torn last line and reads the ids done."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.done_keys = _recover(path)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, line: Mapping[str, Any]) -> None:
        data = (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:  # one write() in practice; looped for the rare short write
            view = view[os.write(self._fd, view) :]

    def close(self) -> None:
        if self._fd < 0:
            return
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1


def _recover(path: Path) -> set[str]:
    """Keys of the whole lines in `path`; a last line without its newline is cut off."""
    if not path.exists():
        return set()
    keys: set[str] = set()
    whole = 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            whole += len(raw)
            try:
                obj = json.loads(raw)
            except ValueError:
                log.warning("%s: unreadable line ignored at byte %d", path, whole - len(raw))
                continue
            key = obj.get("custom_id", obj.get("id")) if isinstance(obj, dict) else None
            if key is not None:
                keys.add(str(key))
    if whole < path.stat().st_size:
        log.warning("%s: cutting a torn last line (%d bytes)", path, path.stat().st_size - whole)
        os.truncate(path, whole)
    return keys


def input_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes) of each non-blank line, streamed."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if raw.strip():
                yield line_no, raw


def resolve_format(path: Path, requested: str) -> str:
    if requested != AUTO:
        return requested
    for count, (_, raw) in enumerate(input_lines(path)):
        if count >= _DETECT_LINES:
            break
        with contextlib.suppress(ValueError):
            return detect_format(json.loads(raw))
    return SIMPLE


def count_lines(path: Path) -> int:
    """Non-blank lines (one cheap pass over the file, for the progress total)."""
    return sum(1 for _ in input_lines(path))
