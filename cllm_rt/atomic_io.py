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


def truncate_jsonl_log(path: str, last_step: int) -> None:
    """Drop the lines of a JSON-lines log whose ``step`` is past ``last_step`` (a resumed run logs them again)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
    atomic_write_text(path, "".join(kept))
