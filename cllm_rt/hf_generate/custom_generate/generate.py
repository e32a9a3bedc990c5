"""The ``custom_generate`` entry point transformers loads from ``cllm_rt.hf.CUSTOM_GENERATE_DIR``.

transformers copies this file into its module cache and runs it, so it holds no logic of its own and imports the
installed package absolutely: see :func:`cllm_rt.hf.generate_from_directory`.
"""

from cllm_rt.hf import generate_from_directory


def generate(model, **arguments):
    return generate_from_directory(model, **arguments)
