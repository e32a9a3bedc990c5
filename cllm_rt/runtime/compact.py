"""The decoding step's own forward for the llama family (llama, mistral, qwen2, qwen3), as gpt-fast writes it.

Same weights (the HF modules' own tensors, nothing copied), same arithmetic in the same order as the HF
forward (bit-identical results), fewer calls around it: through the HF modules a one-token SmolLM2 step spent
~20 ms outside its linear layers (of ~70 ms at 1 thread, ~50 at 2), in small torch ops and Python module calls
that do not shrink with threads; this forward measured 8-9 ms less per step at 2 threads (bench_forward.py).
Here each layer is one Python loop body; the RMSNorms and the rotary embedding are the families' own ops written
out (no module calls; the rotary in four ops instead of eight, its tables made once per step); q/k/v and gate/up
are each one ``ops.linear`` call where that pays (:func:`cllm_rt.ops.linear_pays`: the weights read once for all
rows), torch's linear otherwise; attention runs
over the :class:`~cllm_rt.runtime.cache.JacobiCache` pages as ``runtime/attention.py`` routes it for the HF
forward.

A model quantized by :func:`cllm_rt.quantize.quantize_int8` runs here too: its layer linears are
:class:`~cllm_rt.quantize.Int8Linear`, and q/k/v and gate/up are each one ``ops.linear_int8`` call.

Other architectures (phi3's fused projections, gemma's scaled embeddings and norms) take the HF forward; so do a
model whose layers are not the stock modules (a linear that is neither a plain ``nn.Linear`` nor an
``Int8Linear``, e.g. another quantization or an adapter-wrapped one, computes something else than its ``weight``;
a block whose linears mix the two; a norm that is not the family's RMSNorm), a
model with forward hooks on the modules
this forward does not call (a hook must see what it hooked), a model in training mode, and every model while
:func:`use_compact_forward` is off (to compare the two).
"""

from __future__ import annotations

import torch

from .. import ops
from ..quantize import LAYER_LINEARS, Int8Linear
from .attention import cache_attention

SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})

_enabled = True


def use_compact_forward(enabled: bool) -> None:
    """Decode supported models with this forward (default) or with the HF modules' forward."""
    global _enabled
    _enabled = bool(enabled)


def applies(model) -> bool:
    """Whether the decoding step runs ``model`` through :func:`forward`: asked every step, since hooks come and
    go and a module can be swapped between calls."""
    if not (_enabled and getattr(model.config, "model_type", None) in SUPPORTED_MODEL_TYPES and not model.training):
        return False
    return _stock_and_unhooked(model.base_model)


def _unhooked(module: torch.nn.Module) -> bool:
    return not (module._forward_hooks or module._forward_pre_hooks)


_NORMS = ("input_layernorm", "post_attention_layernorm")


def _stock_norm(module, family: str) -> bool:
    """Whether ``module`` is the family's own RMSNorm without a hook (what :func:`_rms_norm` computes)."""
    return module is not None and type(module).__module__ == family and type(module).__name__.endswith("RMSNorm") \
        and _unhooked(module)


def _stock_and_unhooked(base) -> bool:
    """Whether every module :func:`forward` skips (the base model, the norms, each layer, its attention and MLP
    and their linears) is the stock one (each block's linears all plain ``nn.Linear`` or all ``Int8Linear``,
    each norm the family's RMSNorm)
    without a forward hook, and no global hook is set. Reads ``_modules`` directly: attribute access through ``nn.Module.__getattr__`` made this check ~0.4 ms
    a step for SmolLM2's 30 layers."""
    module_hooks = torch.nn.modules.module
    if module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks or not _unhooked(base):
        return False
    modules, family = base._modules, type(base).__module__
    if type(modules.get("embed_tokens")) is not torch.nn.Embedding or modules.get("rotary_emb") is None \
            or not _stock_norm(modules.get("norm"), family) or modules.get("layers") is None:
        return False
    for layer in modules["layers"]._modules.values():
        if not _unhooked(layer) or not all(_stock_norm(layer._modules.get(name), family) for name in _NORMS):
            return False
        for name, linears in LAYER_LINEARS.items():
            block = layer._modules.get(name)
            if block is None or not _unhooked(block):
                return False
            first = type(block._modules.get(linears[0]))
            if first is not torch.nn.Linear and first is not Int8Linear:
                return False
            for linear in map(block._modules.get, linears):
                if type(linear) is not first or not _unhooked(linear):  # _project calls one kernel per group
                    return False
    return True


def _rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` for the families' RMSNorm: its ops in its order (the same bits), without the module call."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * h.to(x.dtype)


def _rotary_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and a signed sin [B, 1, n, D] for :func:`_rotate`, once per step instead of once per layer."""
    half = sin.shape[-1] // 2
    return cos.unsqueeze(1), torch.cat((-sin[..., :half], sin[..., half:]), dim=-1).unsqueeze(1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """The families' ``apply_rotary_pos_emb`` for one of q, k [B, H, n, D]: ``x * cos + rotate_half(x) * sin``,
    with ``rotate_half(x) * sin`` as ``roll(x) * signed_sin``. The same bits: rotate_half negates the first half
    where signed_sin negates sin instead, and a rounded product only changes sign with either factor. Four ops
    instead of eight, and no call through the ``use_kernel_forward_from_hub`` module transformers wraps it in."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def _project(x: torch.Tensor, linears) -> list[torch.Tensor]:
    """Each linear of ``linears`` (all ``nn.Linear`` or all ``Int8Linear``) applied to ``x``: one ops.linear call
    where it pays, one ops.linear_int8 call for int8 weights (whatever the row count: torch has no int8 linear)."""
    if type(linears[0]) is Int8Linear:
        return ops.linear_int8_unchecked(x, [m.weight for m in linears], [m.scale for m in linears],
                                         [m.bias for m in linears])
    return ops.routed_linear(x, [m.weight for m in linears], [m.bias for m in linears])


def forward(model, input_ids: torch.Tensor, position_ids: torch.Tensor, cache, lengths: torch.Tensor,
            page_table: torch.Tensor | None, parents: torch.Tensor | None) -> torch.Tensor:
    """Hidden states [B, n, d] after the final norm, as ``model.base_model(...).last_hidden_state`` with
    ``runtime/attention.py``'s attention; the block's keys and values are written into ``cache``."""
    base = model.base_model
    x = base.embed_tokens(input_ids)
    cos, signed_sin = _rotary_tables(*base.rotary_emb(x, position_ids=position_ids))
    B, n = input_ids.shape
    for i, layer in enumerate(base.layers):
        attn, mlp = layer.self_attn, layer.mlp
        h = _rms_norm(layer.input_layernorm, x)
        q, k, v = (t.view(B, n, -1, attn.head_dim) for t in _project(h, (attn.q_proj, attn.k_proj, attn.v_proj)))
        if hasattr(attn, "q_norm"):  # qwen3: RMSNorm over each head before the rotation
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = _rotate(q.transpose(1, 2), cos, signed_sin), _rotate(k.transpose(1, 2), cos, signed_sin)
        keys, values = cache.layers[i].update(k, v.transpose(1, 2))
        out = cache_attention(q, keys, values, lengths, page_table, parents, attn.scaling)
        (o,) = _project(out.transpose(1, 2).reshape(B, n, -1), (attn.o_proj,))
        x = x + o
        h = _rms_norm(layer.post_attention_layernorm, x)
        gate, up = _project(h, (mlp.gate_proj, mlp.up_proj))
        (down,) = _project(mlp.act_fn(gate) * up, (mlp.down_proj,))
        x = x + down
    return _rms_norm(base.norm, x)
