"""Routing a Hugging Face model's linear layers through ``cllm_rt.ops.linear`` where that is faster.

Where: :func:`cllm_rt.ops.pair_dot_pays` decides per call (bf16 on a CPU with the AVX512-BF16 kernel, at most
``ops.PAIR_DOT_MAX_ROWS`` rows: a one-token step, or a tree of two or three nodes); every other call, and every
model in another dtype or on another device, runs torch's own linear as before. So a float32 or float64 forward
is untouched, and the float64 exactness tests see the HF forward they always saw.

What changes in bf16: the routed products accumulate in float32 in another order than torch's bf16 GEMM, so a
bf16 decode can pick another token than HF's bf16 ``generate`` where two logits are within bf16 rounding (it
already could: torch's own bf16 GEMM rounds differently at one row than at many).
"""

from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F

from .. import ops


def _routed_forward(self: torch.nn.Linear, input: torch.Tensor) -> torch.Tensor:
    if ops.pair_dot_pays(input):
        return ops.linear(input, [self.weight], [self.bias])[0]
    return F.linear(input, self.weight, self.bias)


@contextlib.contextmanager
def routed_linears(model: torch.nn.Module):
    """Run the ``nn.Linear`` layers of ``model`` through :func:`_routed_forward`, then restore them. Only models
    whose weights are bf16 on a CPU are touched (the only case where the route can pay)."""
    weight = model.get_output_embeddings().weight
    routed = []
    if weight.dtype == torch.bfloat16 and weight.device.type == "cpu":
        routed = [m for m in model.modules() if type(m) is torch.nn.Linear and "forward" not in vars(m)]
    for module in routed:
        module.forward = types.MethodType(_routed_forward, module)
    try:
        yield
    finally:
        for module in routed:
            del module.forward  # the class's forward again
