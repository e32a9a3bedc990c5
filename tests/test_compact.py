"""The decoding step's compact forward (runtime/compact.py) against the HF modules' forward it replaces."""

import pytest
import torch

import cllm_rt
from cllm_rt.quantize import Int8Linear, quantize_int8
from cllm_rt.runtime import compact
from cllm_rt.runtime.attention import jacobi_attention
from cllm_rt.runtime.cache import JacobiCache
from cllm_rt.runtime.linears import routed_linears
from cllm_rt.runtime.step import forward_block, prefill
from tiny_models import random_prompts, tiny_model

FAMILIES = sorted(compact.SUPPORTED_MODEL_TYPES)


@pytest.fixture
def hf_modules():
    """Switch the compact forward off for the test's body, and back on after it."""
    compact.use_compact_forward(False)
    yield
    compact.use_compact_forward(True)


def _forwards(model, use_compact: bool, native: bool = True, rows: int = 2) -> list[torch.Tensor]:
    """Hidden states of a ragged prefill, a 1-token step, a 6-token chain and a 6-node tree, then the cache's keys
    and values; ``rows`` 1 takes the cache's one-row slice writes, 2 its indexed writes."""
    compact.use_compact_forward(use_compact)
    compact.use_native_layers(native)
    try:
        g = torch.Generator().manual_seed(0)
        vocab = model.config.vocab_size
        prompt = torch.randint(1, vocab, (2, 40), generator=g)[:rows]  # past a page
        cache = JacobiCache(model.config.num_hidden_layers, torch.zeros(rows, dtype=torch.int64), 96, page_size=32)
        parents = torch.tensor([[-1, 0, 0, 1, 2, 2], [-1, 0, 1, 1, 0, 4]])[:rows]
        depths = torch.tensor([[0, 1, 1, 2, 2, 2], [0, 1, 2, 2, 1, 2]])[:rows]
        with torch.no_grad(), jacobi_attention(model), routed_linears(model):
            prefill(model, cache, prompt, torch.tensor([40, 29])[:rows])
            out = [cache.layers[0].keys.clone()]
            for n in (1, 6):
                out.append(forward_block(model, cache, torch.randint(1, vocab, (2, n), generator=g)[:rows]))
            out.append(forward_block(model, cache, torch.randint(1, vocab, (2, 6), generator=g)[:rows], depths,
                                     parents))
        return out + [pool for layer in cache.layers for pool in (layer.keys, layer.values)]
    finally:
        compact.use_compact_forward(True)
        compact.use_native_layers(True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("arch", FAMILIES)
def test_compact_forward_gives_the_hf_forward_s_bits(arch, dtype):
    # Same weights, same ops in the same order: identical even in float32, cache included (a chain, a tree, a
    # ragged batch over pages, rows routed to ops.linear and rows left to torch).
    model = tiny_model(arch, dtype=dtype)
    for ours, theirs in zip(_forwards(model, True), _forwards(model, False)):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("arch", FAMILIES)
def test_the_compiled_layer_loop_gives_the_python_loop_s_bits(arch, dtype, rows):
    # cllm_rt::decoder_layers calls the Python loop's ops in its order: the same hidden states and cache, and it
    # is what ran (the Python loop is made to fail while it should not be called)
    model = tiny_model(arch, dtype=dtype)
    assert compact.modules(model).native is not None
    theirs = _forwards(model, True, native=False, rows=rows)
    python_layers = compact._python_layers
    compact._python_layers = None
    try:
        ours = _forwards(model, True, rows=rows)
    finally:
        compact._python_layers = python_layers
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)


def test_an_int8_model_s_compiled_layer_loop_gives_the_python_loop_s_bits():
    model = quantize_int8(tiny_model("qwen2"))
    assert compact.modules(model).native.int8
    for a, b in zip(_forwards(model, True, rows=1), _forwards(model, True, native=False, rows=1), strict=True):
        assert torch.equal(a, b)


def test_a_layer_the_op_does_not_compute_runs_the_python_loop():
    # another activation, or a norm with its own epsilon: the Python loop runs them as the modules say
    model = tiny_model("llama")
    model.model.layers[1].mlp.act_fn = torch.nn.GELU()
    assert compact.modules(model).native is None
    ids, mask = random_prompts(1, [5])
    want = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=8)
    assert torch.equal(cllm_rt.generate(model, ids, mask, max_new_tokens=8).sequences[:, :want.shape[1]], want)
    model = tiny_model("llama")
    model.model.layers[0].input_layernorm.variance_epsilon = 1e-3
    assert compact.modules(model).native is None
    model = tiny_model("llama")
    act = model.model.layers[0].mlp.act_fn
    act.forward = lambda x: torch.nn.functional.silu(x) * 2  # e.g. a hub kernel: its forward, not at::silu
    assert compact.modules(model).native is None
    model.model.layers[0].mlp.act_fn = torch.nn.SiLU()
    assert compact.modules(model).native is not None


def _op_arguments(model):
    """decoder_layers' arguments for a 3-token block after 5 cached tokens of ``model``'s one row."""
    native = compact.modules(model).native
    cache = JacobiCache(model.config.num_hidden_layers, torch.tensor([5]), 64, page_size=32)
    cache.begin_block(3)
    x = torch.randn(1, 3, model.config.hidden_size, dtype=model.dtype)
    cos, signed_sin = compact._rotary_tables(*model.base_model.rotary_emb(x, position_ids=torch.tensor([[5, 6, 7]])))
    pools = [layer.pools(native.kv_heads, native.head_dim, x) for layer in cache.layers]
    return (x, cos, signed_sin, native.params, [k for k, _ in pools], [v for _, v in pools], list(cache.write_index),
            None, None, cache.lengths, cache.page_table, None, native.head_dim, native.scale, native.eps, False)


def test_decoder_layers_passes_opcheck():
    torch.library.opcheck(torch.ops.cllm_rt.decoder_layers.default, _op_arguments(tiny_model("llama")))


def test_decoder_layers_refuses_malformed_arguments_in_one_line():
    args = list(_op_arguments(tiny_model("llama")))
    bad = {3: args[3][:-1], 6: [], 12: 0}  # a parameter short, no cache write, no head size
    for index, value in bad.items():
        wrong = list(args)
        wrong[index] = value
        with pytest.raises(RuntimeError, match="decoder_layers: ") as failure:
            torch.ops.cllm_rt.decoder_layers(*wrong)
        assert "\n" not in str(failure.value).split("Exception raised from")[0].strip()


@pytest.mark.parametrize("arch", ["phi3", "gemma"])
def test_other_families_take_the_hf_forward(arch):
    assert not compact.applies(tiny_model(arch))
    assert compact.applies(tiny_model("llama"))


def test_a_training_model_or_the_switch_keeps_the_hf_forward(hf_modules):
    model = tiny_model("llama")
    assert not compact.applies(model)
    compact.use_compact_forward(True)
    assert compact.applies(model) and not compact.applies(model.train())


@pytest.mark.parametrize("arch", FAMILIES)
def test_generate_through_the_compact_forward_equals_hf_greedy(arch):
    model = tiny_model(arch)
    ids, mask = random_prompts(2, [5, 3])
    want = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12)
    got = cllm_rt.generate(model, ids, mask, max_new_tokens=12)
    assert torch.equal(got.sequences[:, :want.shape[1]], want)


def test_a_hook_on_a_skipped_module_keeps_the_hf_forward():
    model = tiny_model("llama")
    calls = []
    handle = model.model.layers[1].mlp.up_proj.register_forward_hook(lambda *args: calls.append(1))
    assert not compact.applies(model)
    cllm_rt.generate(model, *random_prompts(1, [4]), max_new_tokens=3)
    assert calls  # the hook saw the decoding steps
    handle.remove()
    assert compact.applies(model)


def test_a_hooked_or_replaced_norm_keeps_the_hf_forward():
    # the compact forward writes the RMSNorm out instead of calling it: a hook on it, or another norm, must see
    # the HF forward
    model = tiny_model("llama")
    handle = model.model.layers[0].post_attention_layernorm.register_forward_pre_hook(lambda *args: None)
    assert not compact.applies(model)
    handle.remove()
    assert compact.applies(model)
    stock = model.model.norm
    model.model.norm = torch.nn.LayerNorm(model.config.hidden_size)
    assert not compact.applies(model)
    model.model.norm = stock
    assert compact.applies(model)


def test_a_layer_that_is_not_the_stock_module_keeps_the_hf_forward():
    class Scaled(torch.nn.Linear):  # computes something else than its weight alone
        def forward(self, x):
            return 2 * super().forward(x)

    model = tiny_model("llama")
    ids, mask = random_prompts(1, [5])
    cllm_rt.generate(model, ids, mask, max_new_tokens=4)  # decoded once with the stock modules
    old = model.model.layers[0].mlp.up_proj
    scaled = Scaled(old.in_features, old.out_features, bias=False, dtype=old.weight.dtype)
    scaled.weight = old.weight
    model.model.layers[0].mlp.up_proj = scaled  # then swapped: the next call must notice
    assert not compact.applies(model)
    want = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=8)
    assert torch.equal(cllm_rt.generate(model, ids, mask, max_new_tokens=8).sequences[:, :want.shape[1]], want)


def test_a_weight_or_norm_epsilon_replaced_between_calls_is_what_the_next_call_decodes_with():
    # modules() walks the modules again only where something it read changed: a new Parameter object in place
    # of a weight, or a new attribute value, is such a change
    model = tiny_model("llama", dtype=torch.float64)
    ids, mask = random_prompts(1, [5])
    cllm_rt.generate(model, ids, mask, max_new_tokens=4)
    up = model.model.layers[0].mlp.up_proj
    up.weight = torch.nn.Parameter(torch.randn_like(up.weight) * 0.5)
    want = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=8)
    assert compact.modules(model).native.params[4 + 3 * 5] is up.weight  # up_proj's weight slot
    assert torch.equal(cllm_rt.generate(model, ids, mask, max_new_tokens=8).sequences[:, :want.shape[1]], want)
    model.model.layers[1].post_attention_layernorm.variance_epsilon = 1e-3
    assert compact.modules(model).native is None  # the op takes one epsilon: the Python loop runs it
    want = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=8)
    assert torch.equal(cllm_rt.generate(model, ids, mask, max_new_tokens=8).sequences[:, :want.shape[1]], want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: biases on q/k/v
def test_an_int8_model_takes_the_compact_forward_with_the_hf_forward_s_bits(arch, dtype):
    # the compact forward calls ops.linear_int8 once per group (q/k/v, gate/up), the HF modules once per linear:
    # each weight's outputs do not depend on the others in the call, nor on the rows
    model = quantize_int8(tiny_model(arch, dtype=dtype))
    assert compact.applies(model)
    for ours, theirs in zip(_forwards(model, True), _forwards(model, False)):
        assert torch.equal(ours, theirs)


def test_a_block_mixing_int8_and_float_linears_keeps_the_hf_forward():
    model = tiny_model("llama")
    model.model.layers[1].mlp.up_proj = Int8Linear.from_linear(model.model.layers[1].mlp.up_proj)
    assert not compact.applies(model)
    ids, mask = random_prompts(1, [5])
    want = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=8)
    assert torch.equal(cllm_rt.generate(model, ids, mask, max_new_tokens=8).sequences[:, :want.shape[1]], want)
