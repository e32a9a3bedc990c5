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

The layer loop runs as one compiled op, ``cllm_rt::decoder_layers`` (``csrc/decoder_layers.cpp``), wherever the
extension's kernels run (:func:`cllm_rt.ops.native_kernel_for`): the same ops in the same order as
:func:`_python_layers`, its reference (the same bits), without the interpreter between them (~6 of ~27 ms a
one-token SmolLM2 step at 2 threads on an AMD EPYC Zen 4). :func:`use_native_layers` turns it off to compare.

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

import operator
import typing
import weakref

import torch

from .. import ops
from ..quantize import LAYER_LINEARS, Int8Linear
from .attention import cache_attention

SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})

_enabled = True
_native = True


def use_compact_forward(enabled: bool) -> None:
    """Decode supported models with this forward (default) or with the HF modules' forward."""
    global _enabled
    _enabled = bool(enabled)


def use_native_layers(enabled: bool) -> None:
    """Run the layer loop as the compiled op ``cllm_rt::decoder_layers`` (default, where the extension's kernels
    run) or as :func:`_python_layers`, its reference."""
    global _native
    _native = bool(enabled)


def applies(model) -> bool:
    """Whether the decoding step runs ``model`` through :func:`forward`."""
    return modules(model) is not None


class Modules(typing.NamedTuple):
    """What :func:`forward` reads from a model's modules."""
    native: _NativeParams | None  # what cllm_rt::decoder_layers reads (None: a layer it does not compute)


def modules(model) -> Modules | None:
    """What :func:`forward` reads from ``model``'s modules, or None where the step takes the HF forward instead.
    Asked every step, since hooks come and go and a module can be swapped between calls; the walk over the
    modules runs again only where something it read has changed (:class:`_Reads`)."""
    if not (_enabled and getattr(model.config, "model_type", None) in SUPPORTED_MODEL_TYPES and not model.training):
        return None
    module_hooks = torch.nn.modules.module
    if module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks:
        return None
    base = model.base_model
    walk = _walks.get(base)
    if walk is None or not walk[0].still_hold():
        reads = _Reads()
        found = Modules(_native_params(base, reads)) if _stock_and_unhooked(base, reads) else None
        walk = _walks[base] = (reads, found)
    return walk[1]


class _Reads:
    """What a walk over the modules read, so that the next step can check that it all still holds, in C loops,
    instead of walking again: for SmolLM2's 30 layers ~0.5 ms a step against ~1 ms (~0.06 ms against ~0.3 ms
    where the modules are in cache, which a step's weights have evicted; 1 thread, AMD EPYC Zen 4). Reads
    go to the modules' own dicts (``_modules``, ``_parameters``, ``__dict__``, hooks), never through
    ``nn.Module.__getattr__``: a module, parameter, attribute or hook set or removed changes one of them."""

    def __init__(self):
        self.mappings: list[dict] = []  # mappings[i][keys[i]] was values[i]
        self.keys: list[str] = []
        self.values: list = []
        self.sized: list[dict] = []  # dicts read whole (iterated, or hooks: any at all) had sizes[i] entries
        self.sizes: list[int] = []

    def get(self, mapping: dict, key: str):
        value = mapping.get(key)
        self.mappings.append(mapping)
        self.keys.append(key)
        self.values.append(value)
        return value

    def each(self, mapping: dict) -> list:
        self.sized.append(mapping)
        self.sizes.append(len(mapping))
        return [self.get(mapping, key) for key in list(mapping)]

    def unhooked(self, module: torch.nn.Module) -> bool:
        hooks = (module._forward_hooks, module._forward_pre_hooks)
        self.sized += hooks
        self.sizes += map(len, hooks)
        return not any(hooks)

    def still_hold(self) -> bool:
        return list(map(len, self.sized)) == self.sizes \
            and all(map(operator.is_, map(dict.get, self.mappings, self.keys), self.values))


_walks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # base model -> (its _Reads, what modules() found)


_NORMS = ("input_layernorm", "post_attention_layernorm")


def _stock_norm(module, family: str, reads: _Reads) -> bool:
    """Whether ``module`` is the family's own RMSNorm without a hook (what :func:`_rms_norm` computes)."""
    return module is not None and type(module).__module__ == family and type(module).__name__.endswith("RMSNorm") \
        and reads.unhooked(module)


def _stock_and_unhooked(base, reads: _Reads) -> bool:
    """Whether every module :func:`forward` skips (the base model, the norms, each layer, its attention and MLP
    and their linears) is the stock one (each block's linears all plain ``nn.Linear`` or all ``Int8Linear``,
    each norm the family's RMSNorm) without a forward hook."""
    if not reads.unhooked(base):
        return False
    modules, family = base._modules, type(base).__module__
    if type(reads.get(modules, "embed_tokens")) is not torch.nn.Embedding or reads.get(modules, "rotary_emb") is None \
            or not _stock_norm(reads.get(modules, "norm"), family, reads):
        return False
    layers = reads.get(modules, "layers")
    if layers is None:
        return False
    for layer in reads.each(layers._modules):
        if not reads.unhooked(layer) or not all(_stock_norm(reads.get(layer._modules, name), family, reads)
                                                for name in _NORMS):
            return False
        for name, linears in LAYER_LINEARS.items():
            block = reads.get(layer._modules, name)
            if block is None or not reads.unhooked(block):
                return False
            first = type(block._modules.get(linears[0]))
            if first is not torch.nn.Linear and first is not Int8Linear:
                return False
            for linear in (reads.get(block._modules, linear_name) for linear_name in linears):
                if type(linear) is not first or not reads.unhooked(linear):  # _project calls one kernel per group
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


def forward(model, found: Modules, input_ids: torch.Tensor, position_ids: torch.Tensor, cache, lengths: torch.Tensor,
            page_table: torch.Tensor | None, parents: torch.Tensor | None) -> torch.Tensor:
    """Hidden states [B, n, d] after the final norm, as ``model.base_model(...).last_hidden_state`` with
    ``runtime/attention.py``'s attention; the block's keys and values are written into ``cache``. ``found``:
    what :func:`modules` just said of ``model``."""
    base = model.base_model
    x = base.embed_tokens(input_ids)
    cos, signed_sin = _rotary_tables(*base.rotary_emb(x, position_ids=position_ids))
    native = found.native if _native and ops.native_kernel_for(x.device) else None
    if native is None:
        x = _python_layers(base, x, cos, signed_sin, cache, lengths, page_table, parents)
    else:
        x = _native_layers(native, x, cos, signed_sin, cache, lengths, page_table, parents)
    return _rms_norm(base.norm, x)


def _python_layers(base, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, cache, lengths: torch.Tensor,
                   page_table: torch.Tensor | None, parents: torch.Tensor | None) -> torch.Tensor:
    """The decoder layers over the embeddings ``x`` [B, n, d]: the reference of ``cllm_rt::decoder_layers``,
    and what runs where it does not (no extension, its kernels off, another device, another activation)."""
    B, n = x.shape[:2]
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
    return x


class _NativeParams(typing.NamedTuple):
    """What ``cllm_rt::decoder_layers`` reads besides the step's tensors (see csrc/ops.cpp)."""
    params: list  # per layer: input, post-attention, q and k norm weights (None: none), then per linear
    #               (q, k, v, o, gate, up, down) its weight, bias and int8 scales (None: none)
    eps: float
    kv_heads: int
    head_dim: int
    scale: float
    int8: bool


def _tensor(module: torch.nn.Module, name: str, reads: _Reads) -> torch.Tensor | None:
    """``module.<name>``, a parameter or a buffer."""
    tensor = reads.get(module._parameters, name)
    return tensor if tensor is not None else reads.get(module._buffers, name)


def _stock_silu(module, reads: _Reads) -> bool:
    """Whether ``module`` is torch's or transformers' SiLU as shipped (what the op computes, ``at::silu``): no hook,
    and no forward of its own on the instance (transformers' hub kernels put one there)."""
    stock = type(module) is torch.nn.SiLU or (type(module).__name__ == "SiLUActivation"
                                                and type(module).__module__ == "transformers.activations")
    return stock and reads.unhooked(module) and reads.get(vars(module), "forward") is None


def _native_params(base, reads: _Reads) -> _NativeParams | None:
    """The layers' tensors in ``cllm_rt::decoder_layers``' order, for a ``base`` whose modules are stock
    (:func:`_stock_and_unhooked`); None where a layer computes something the op does not: an activation other
    than SiLU, norms of different epsilons, another head size or attention scale across layers, a qwen3 head
    norm that is not the stock RMSNorm."""
    layers = list(base._modules["layers"]._modules.values())
    first = layers[0]._modules["self_attn"]
    eps = reads.get(vars(base._modules["norm"]), "variance_epsilon")
    head_dim, scale = reads.get(vars(first), "head_dim"), reads.get(vars(first), "scaling")
    if eps is None or head_dim is None or scale is None:  # not instance attributes: nothing a step can check
        return None
    family = type(base).__module__
    params: list = []
    int8 = False
    for layer in layers:
        attn, mlp = layer._modules["self_attn"], layer._modules["mlp"]
        if not _stock_silu(reads.get(mlp._modules, "act_fn"), reads) or reads.get(vars(attn), "head_dim") != head_dim \
                or reads.get(vars(attn), "scaling") != scale:
            return None
        head_norms = [reads.get(attn._modules, "q_norm"), reads.get(attn._modules, "k_norm")]
        if any(norm is not None and not _stock_norm(norm, family, reads) for norm in head_norms):
            return None
        norms = [layer._modules[name] for name in _NORMS] + head_norms
        if any(norm is not None and reads.get(vars(norm), "variance_epsilon") != eps for norm in norms):
            return None
        params += [None if norm is None else _tensor(norm, "weight", reads) for norm in norms]
        for block_name, names in LAYER_LINEARS.items():
            block = layer._modules[block_name]
            for name in names:
                linear = block._modules[name]
                scales = _tensor(linear, "scale", reads) if type(linear) is Int8Linear else None
                int8 = int8 or scales is not None
                params += [_tensor(linear, "weight", reads), _tensor(linear, "bias", reads), scales]
    kv_heads = _tensor(first._modules["k_proj"], "weight", reads).shape[0] // head_dim
    return _NativeParams(params, eps, kv_heads, head_dim, scale, int8)


def _native_layers(native: _NativeParams, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, cache,
                   lengths: torch.Tensor, page_table: torch.Tensor | None, parents: torch.Tensor | None
                   ) -> torch.Tensor:
    """:func:`_python_layers` as one ``cllm_rt::decoder_layers`` call; the pools are grown here, as ``update``
    grows them, and the op writes the block's keys and values where ``cache.begin_block`` said."""
    pools = [layer.pools(native.kv_heads, native.head_dim, x) for layer in cache.layers]
    where = cache.write_index
    if isinstance(where[0], int):
        write_slice, write_pages, write_offsets = list(where), None, None
    else:
        write_slice, (write_pages, write_offsets) = [], where
    ours = ops.linear_pays(x)  # every layer linear of the step has x's rows and dtype
    if native.int8 and x.device.type == "cpu":
        ops.linear_plan(x.dtype)  # int8 tiles take the plan's tuning at every row count
    return torch.ops.cllm_rt.decoder_layers(
        x, cos, signed_sin, native.params, [k for k, _ in pools], [v for _, v in pools], write_slice, write_pages,
        write_offsets, lengths, page_table, parents, native.head_dim, native.scale, native.eps, ours)
