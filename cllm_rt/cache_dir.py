"""Where cllm_rt keeps what it makes once per machine: converted models (``models.py``) and the measured
linear plans (``ops.linear_plan``)."""

from __future__ import annotations

import os
import pathlib


def cache_dir() -> pathlib.Path:
    """``$CLLM_RT_CACHE`` if set, else ``$XDG_CACHE_HOME/cllm_rt``, else ``~/.cache/cllm_rt``."""
    if os.environ.get("CLLM_RT_CACHE"):
        return pathlib.Path(os.environ["CLLM_RT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return pathlib.Path(xdg).expanduser() / "cllm_rt" if xdg else pathlib.Path.home() / ".cache" / "cllm_rt"
