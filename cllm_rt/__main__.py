"""``python -m cllm_rt``: the ``cllm-rt`` command (see :mod:`cllm_rt.cli`)."""

from .cli import main

main()
