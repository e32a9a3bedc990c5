"""cllm_rt: exact Jacobi decoding and consistency training (CLLMs) for Hugging Face decoder-only models."""

from . import ops
from .decoding import GenerationOutput, GenerationStats, SUPPORTED_MODEL_TYPES, generate

__all__ = ["ops", "generate", "GenerationOutput", "GenerationStats", "SUPPORTED_MODEL_TYPES"]
__version__ = "0.1.0"
