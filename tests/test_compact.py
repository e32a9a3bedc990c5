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


def _forwards(model, use_compact: bool) -> list[torch.Tensor]:
    """Hidden states of a ragged 2-row prefill, a 1-token step, a 6-token chain and a 6-node tree."""
    compact.use_compact_forward(use_compact)
    try:
        g = torch.Generator().manual_seed(0)
        vocab = model.config.vocab_size
        prompt = torch.randint(1, vocab, (2, 40), generator=g)  # past a page
        cache = JacobiCache(model.config.num_hidden_layers, torch.zeros(2, dtype=torch.int64), 96, page_size=32)
        parents = torch.tensor([[-1, 0, 0, 1, 2, 2], [-1, 0, 1, 1, 0, 4]])
        depths = torch.tensor([[0, 1, 1, 2, 2, 2], [0, 1, 2, 2, 1, 2]])
        with torch.no_grad(), jacobi_attention(model), routed_linears(model):
            prefill(model, cache, prompt, torch.tensor([40, 29]))
            out = [cache.layers[0].keys.clone()]
            for n in (1, 6):
                out.append(forward_block(model, cache, torch.randint(1, vocab, (2, n), generator=g)))
            out.append(forward_block(model, cache, torch.randint(1, vocab, (2, 6), generator=g), depths, parents))
        return out
    finally:
        compact.use_compact_forward(True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("arch", FAMILIES)
def test_compact_forward_gives_the_hf_forward_s_bits(arch, dtype):
    # Same weights, same ops in the same order: identical even in float32, cache included (a chain, a tree, a
    # ragged batch over pages, rows routed to ops.linear and rows left to torch).
    model = tiny_model(arch, dtype=dtype)
    for ours, theirs in zip(_forwards(model, True), _forwards(model, False)):
        assert torch.equal(ours, theirs)


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
