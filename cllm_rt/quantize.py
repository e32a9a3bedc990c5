"""Weight-only int8 for the llama family's layer linears: int8 weights with one scale per output row.

``quantize_int8(model)`` replaces every decoder layer's q/k/v/o and gate/up/down ``nn.Linear`` with an
:class:`Int8Linear` (symmetric per-row quantization: ``scale = max|w| / 127``, ``q = round(w / scale)``), whose
forward is ``ops.linear_int8``. The layers' weights then stream at a quarter of their float32 bytes, which is
what a decoding step of few tokens waits on (README, "What a wider forward costs"). The embeddings and the norms
stay as they are; the LM head too unless ``lm_head=True``: on SmolLM2 (Zen 5) an int8 head took the one-token
step from ~13.4 to ~11.3 ms at 1 thread but moved the greedy answers twice as far from the float32 model's
(README), so it is the caller's choice, not the default.

Exact means exact with respect to the quantized model: HF's ``model.generate`` on the quantized model runs the
same kernel as cllm_rt's step, and the kernel's rows do not depend on how many rows a call holds, so cllm_rt's
decoding gives ``generate``'s tokens (tested in float64, as every exactness test); with the int8 LM head too, a
float32 token tree gives the tokens one-token steps give (tested). A float LM head (``weights="int8"``) keeps
float32's caveat: its product takes another kernel at a one-token step than over a tree (``ops.greedy_verify``),
so a near-tie can round the other way, as for a float32 model (README, *Precision*). It is not the float model's
output: the quantized weights are another model, whose greedy answers drift from the original's (README).
"""

from __future__ import annotations

import torch

from . import ops

__all__ = ["Int8Linear", "quantize_int8", "LAYER_LINEARS"]

# The linears quantize_int8 replaces in each decoder layer: block name -> its linears.
LAYER_LINEARS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


class Int8Linear(torch.nn.Module):
    """``y = (x @ weight.T) * scale + bias`` with ``weight`` int8 [out, in] and ``scale`` [out] in the input's
    float dtype (float32 or float64), through ``ops.linear_int8``. Made by :meth:`from_linear`; the tensors are
    buffers (nothing here trains), saved in the state dict."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> "Int8Linear":
        """The per-row symmetric quantization of ``linear`` (float32 or float64 weights). A row of zeros gets
        scale 1 and zeros."""
        w = linear.weight.detach()
        _check_quantizable(linear)
        scale = w.abs().amax(dim=1) / 127
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a zero row (or one whose max/127 underflows)
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q, scale, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear_int8_unchecked(x, [self.weight], [self.scale], [self.bias])[0]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _check_quantizable(linear: torch.nn.Module) -> None:
    weight = getattr(linear, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"quantize_int8 needs a float32 or float64 model (the int8 kernel's input dtypes), got "
                         f"{getattr(weight, 'dtype', None)}: load it with dtype='float32'")
    if not bool(weight.isfinite().all()):
        raise ValueError("quantize_int8 needs finite weights: this model has inf or NaN in a linear")


def quantize_int8(model: torch.nn.Module, *, lm_head: bool = False) -> torch.nn.Module:
    """Replaces the layer linears of ``model`` (a llama-family causal LM on a CPU or CUDA device, in float32 or
    float64: the dtypes of ``ops.linear_int8``'s input), and with ``lm_head`` its LM head, by
    :class:`Int8Linear` in place and returns it. A tied input embedding stays float (a step reads only its
    tokens' rows), the int8 head beside it. An int8 head leaves no float head for a draft head to read (the
    decoder refuses the pair). Raises a one-line ``ValueError`` for another dtype or a model without
    llama-style layers, leaving the model as it was."""
    base = getattr(model, "base_model", None)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"quantize_int8 needs a llama-style model (base_model.layers), got {type(model).__name__}")
    targets = []  # all checked before any is replaced: a refused model is left as it was
    for layer in layers:
        for block_name, names in LAYER_LINEARS.items():
            block = getattr(layer, block_name, None)
            for name in names:
                linear = getattr(block, name, None)
                if type(linear) is not torch.nn.Linear:
                    raise ValueError(f"quantize_int8 needs {block_name}.{name} to be an nn.Linear in every layer, "
                                     f"got {type(linear).__name__}")
                _check_quantizable(linear)
                targets.append((block, name, linear))
    head = model.get_output_embeddings()
    _check_quantizable(head)  # the step's activations take its dtype, whether or not it is quantized
    if lm_head and type(head) is not torch.nn.Linear:
        raise ValueError(f"quantize_int8 needs the LM head to be an nn.Linear, got {type(head).__name__}")
    for block, name, linear in targets:
        setattr(block, name, Int8Linear.from_linear(linear))
    if lm_head:
        model.set_output_embeddings(Int8Linear.from_linear(head))
    return model
