"""Routing a Hugging Face model's linear layers through ``cllm_rt.ops.linear`` where that is faster.

Where: :func:`cllm_rt.ops.linear_pays` decides per call, from what :func:`cllm_rt.ops.linear_plan` measured on this
machine: float32/float64/bf16 calls of ``ops.LINEAR_MIN_ROWS`` to ``ops.LINEAR_MAX_ROWS`` rows (a token tree's or a
batch's forward: the weights are read once for all its rows, where torch's small-row GEMM re-reads them per row;
bf16 only up to 8 rows where the CPU has AMX), and fewer rows (a one-token step, a tree of 2-3 nodes) where it
measured ``ops.linear`` faster. Every other call (a prefill), and every model on another device, runs torch's own
linear as before. The llama family's decoding step does not use this route: its own forward
(``runtime/compact.py``) asks ``ops.linear_pays`` itself. The float64 exactness tests run through both: their
trees and batches have those row counts.

What changes in float32 and bf16: the routed products sum in another order than torch's GEMM, so a decode can
pick another token than HF's ``generate`` where two logits are within rounding (it already could: torch's own
GEMM rounds differently at one row than at many). The kernel's sums do not depend on the row count, so within
the route a token's bits do not depend on the tree it was verified in.
"""

from __future__ import annotations

import contextlib
import types

import torch

from .. import ops


def _routed_forward(self: torch.nn.Linear, input: torch.Tensor) -> torch.Tensor:
    return ops.routed_linear(input, [self.weight], [self.bias])[0]


@contextlib.contextmanager
def routed_linears(model: torch.nn.Module):
    """Run the ``nn.Linear`` layers of ``model`` through :func:`_routed_forward`, then restore them. Only models
    on a CPU are touched (the only device where the route can pay)."""
    routed = []
    if model.get_output_embeddings().weight.device.type == "cpu":
        routed = [m for m in model.modules() if type(m) is torch.nn.Linear and "forward" not in vars(m)]
    for module in routed:
        module.forward = types.MethodType(_routed_forward, module)
    try:
        yield
    finally:
        for module in routed:
            del module.forward  # the class's forward again
