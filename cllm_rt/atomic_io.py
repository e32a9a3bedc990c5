"""Crash-safe file writes: a file is either absent, its old version or its complete new version.

Trajectory shards, manifests and training checkpoints are written to a temporary name beside the target,
flushed to disk, then renamed over it with ``os.replace`` (atomic on POSIX and Windows within one file
system). A process killed at any instant therefore leaves no torn file that a rerun could mistake for
finished work; at worst a stale hidden ``.<name>.tmp-<pid>`` file (hidden, so directory scans and
emptiness checks ignore it).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from typing import Callable


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` to produce the file, then move it onto ``path`` in one step."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # reach the disk before the rename makes the file visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def atomic_write_json(path: str, value) -> None:
    atomic_write_text(path, json.dumps(value, indent=1, sort_keys=True) + "\n")


def remove_stale_temporaries(folder: str) -> None:
    """Delete the ``.<name>.tmp-<pid>`` files that killed writers left in ``folder`` (call it before writing)."""
    for name in os.listdir(folder):
        if re.fullmatch(r"\..+\.tmp-\d+", name) and os.path.isfile(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))


def read_jsonl_log(path: str) -> list[dict]:
    """The entries of a JSON-lines log written by appends. A power cut can tear the last append (logs are not
    fsynced per line): a last line that is not JSON is dropped with a warning; a torn line before it is an error."""
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    entries = []
    for number, line in enumerate(lines, 1):
        try:
            entries.append(json.loads(line))
        except ValueError:
            if number < len(lines):
                raise ValueError(f"{path}:{number} is not JSON (only a last line, torn by a power cut, is dropped)"
                                 ) from None
            warnings.warn(f"{path}: dropped a torn last line ({len(line)} characters; the process was cut off while "
                          "appending it)", stacklevel=2)
    return entries


def truncate_jsonl_log(path: str, last_step: int) -> None:
    """Drop the lines of a JSON-lines log whose ``step`` is past ``last_step`` (a resumed run logs them again),
    and a torn last line."""
    if not os.path.exists(path):
        return
    kept = [entry for entry in read_jsonl_log(path) if entry["step"] <= last_step]
    atomic_write_text(path, "".join(json.dumps(entry) + "\n" for entry in kept))
