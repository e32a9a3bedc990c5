"""cllm_rt: exact Jacobi decoding and consistency training (CLLMs) for Hugging Face decoder-only models.

``cllm_rt.generate`` and ``cllm_rt.ops`` are loaded on first use (PEP 562), so ``import cllm_rt`` costs
nothing until then: the ``cllm-rt`` command can set OpenMP's wait policy before torch is imported, and
``cllm-rt --help`` needs no torch at all. Nothing here imports :mod:`cllm_rt.training` or :mod:`cllm_rt.demo`.
"""

import importlib

__version__ = "0.1.0"

_RUNTIME_NAMES = ("generate", "GenerationOutput", "GenerationStats", "SUPPORTED_MODEL_TYPES")
__all__ = ["ops", *_RUNTIME_NAMES]


def __getattr__(name: str):
    if name == "ops":
        return importlib.import_module(".ops", __name__)
    if name in _RUNTIME_NAMES:
        return getattr(importlib.import_module(".runtime.decoding", __name__), name)
    raise AttributeError(f"module 'cllm_rt' has no attribute {name!r}")
