"""Weight-only int8 (cllm_rt.quantize): the quantizer, and exactness with respect to the quantized model.

The quantized model is the reference: HF's ``generate`` on it runs the same ``ops.linear_int8`` as cllm_rt's step,
so greedy decoding must give its tokens exactly (float64, as every exactness test), and in float32 a token tree
must give the tokens of one-token steps (the kernel's rows do not depend on the row count).
"""

import pytest
import torch

import cllm_rt
from cllm_rt import draft_head, ops
from cllm_rt.models import load_model
from cllm_rt.quantize import LAYER_LINEARS, Int8Linear, quantize_int8
from cllm_rt.runtime import compact
from tiny_models import random_prompts, tiny_model

MAX_NEW = 37


def test_per_row_quantization_is_within_half_a_step_and_uses_the_whole_range():
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(40, 6, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(6, 40, generator=g) * torch.tensor([1e-3, 0.1, 1, 10, 0, 3])[:, None])
    q = Int8Linear.from_linear(linear)
    assert q.weight.dtype == torch.int8 and q.scale.dtype == torch.float64
    dequantized = q.weight.double() * q.scale[:, None]
    assert ((dequantized - linear.weight).abs() <= q.scale[:, None] / 2 + 1e-15).all()
    nonzero = torch.tensor([True, True, True, True, False, True])
    assert (q.weight.abs().amax(1)[nonzero] == 127).all()  # each row's largest weight maps to +-127
    assert (q.weight[4] == 0).all() and q.scale[4] == 1  # a row of zeros: no division by zero
    x = torch.randn(3, 40, dtype=torch.float64, generator=g)
    torch.testing.assert_close(q(x), x @ dequantized.T + linear.bias, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("lm_head", [False, True])
def test_quantize_int8_replaces_every_layer_linear_and_the_head_if_asked(lm_head):
    model = tiny_model("llama")
    head, embed = model.lm_head, model.model.embed_tokens
    assert quantize_int8(model, lm_head=lm_head) is model
    for layer in model.model.layers:
        for block, names in LAYER_LINEARS.items():
            assert all(type(getattr(getattr(layer, block), name)) is Int8Linear for name in names)
    assert not any(type(m) is torch.nn.Linear for m in model.model.modules())
    assert model.model.embed_tokens is embed
    if lm_head:
        assert type(model.get_output_embeddings()) is Int8Linear
        assert torch.equal(model.lm_head.weight, Int8Linear.from_linear(head).weight)
    else:
        assert model.lm_head is head


@pytest.mark.parametrize("lm_head", [False, True], ids=["layers", "layers+head"])
@pytest.mark.parametrize("drafts", ["auto", None])
@pytest.mark.parametrize("block_size", [1, 5, 16])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_decoding_an_int8_model_equals_its_hf_generate(arch, block_size, drafts, lm_head):
    model = quantize_int8(tiny_model(arch), lm_head=lm_head)
    assert compact.applies(model)  # the step's own forward, not the HF modules
    ids, mask = random_prompts(3, [5, 1, 9])
    want = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=MAX_NEW, pad_token_id=0)
    unquantized = tiny_model(arch).generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=MAX_NEW,
                                            pad_token_id=0)
    assert not torch.equal(want, unquantized)  # another model: the test compares against the quantized one
    got = cllm_rt.generate(model, ids, mask, max_new_tokens=MAX_NEW, block_size=block_size, pad_token_id=0,
                           drafts=drafts)
    torch.testing.assert_close(got.sequences, want, rtol=0, atol=0)


@pytest.mark.parametrize("sample", [{}, dict(do_sample=True, temperature=0.9, top_k=20, seed=3)],
                         ids=["greedy", "sampled"])
def test_float32_int8_trees_give_the_tokens_of_one_token_steps(sample):
    # float32 rounding depends on the order of a sum; the kernel's order does not depend on the row count, so with
    # every linear int8 (the head too: a float head takes other kernels at other row counts) a tree's verify
    # forward picks (or samples) the tokens one-token steps pick
    model = quantize_int8(tiny_model("llama", dtype=torch.float32), lm_head=True)
    ids, mask = random_prompts(3, [5, 1, 9])
    steps = cllm_rt.generate(model, ids, mask, max_new_tokens=64, block_size=1, drafts=None, pad_token_id=0,
                             **sample)
    trees = cllm_rt.generate(model, ids, mask, max_new_tokens=64, block_size=16, drafts="auto", pad_token_id=0,
                             **sample)
    torch.testing.assert_close(trees.sequences, steps.sequences, rtol=0, atol=0)
    assert trees.stats.forward_passes < steps.stats.forward_passes  # trees did accept more than one token


def test_a_draft_head_needs_the_float_lm_head():
    model = quantize_int8(tiny_model("llama"), lm_head=True)
    draft_head.attach(model, draft_head.DraftHead(model.config.hidden_size, 2).to(torch.float64))
    with pytest.raises(ValueError, match="a draft head reads the float LM head"):
        cllm_rt.generate(model, *random_prompts(1, [4]), max_new_tokens=3)
    # the layers alone quantized: the head's guesses read the float head, and the output is still exact
    model = quantize_int8(tiny_model("llama"))
    draft_head.attach(model, draft_head.DraftHead(model.config.hidden_size, 2).to(torch.float64))
    ids, mask = random_prompts(2, [4, 6])
    want = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12, pad_token_id=0)
    got = cllm_rt.generate(model, ids, mask, max_new_tokens=12, pad_token_id=0, drafts=("head", "jacobi"))
    assert torch.equal(got.sequences, want) and got.stats.proposed_by_source["head"] > 0


def test_quantize_int8_refuses_what_the_kernel_cannot_run():
    with pytest.raises(ValueError, match="float32 or float64 model.*got torch.bfloat16"):
        quantize_int8(tiny_model("llama", dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="llama-style model"):
        quantize_int8(torch.nn.Linear(2, 2))
    model = tiny_model("phi3")  # fused qkv_proj: no q_proj to quantize
    with pytest.raises(ValueError, match="self_attn.q_proj to be an nn.Linear"):
        quantize_int8(model)
    assert not any(isinstance(m, Int8Linear) for m in model.modules())  # left as it was
    model = tiny_model("llama", dtype=torch.float32)
    model.model.layers[-1].mlp.down_proj.to(torch.bfloat16)  # found before the first layer is replaced
    with pytest.raises(ValueError, match="float32 or float64 model.*got torch.bfloat16: load it with"):
        quantize_int8(model)
    assert not any(isinstance(m, Int8Linear) for m in model.modules())
    model = tiny_model("llama", dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight[1, 2] = float("nan")
    with pytest.raises(ValueError, match="needs finite weights"):
        quantize_int8(model)
    with pytest.raises(ValueError, match="weights must be None .*, 'int8' or 'int8\\+head', not 'int4'"):
        load_model("smollm2-135m-instruct", weights="int4")  # checked before anything loads
    with pytest.raises(ValueError, match="weights='int8' needs dtype float32 or float64 .*, not torch.bfloat16"):
        load_model("smollm2-135m-instruct", dtype="bfloat16", weights="int8")


def test_int8_models_are_told_apart_and_train_no_draft_head():
    from cllm_rt.training.draft_head import fit_head, head_examples

    a = quantize_int8(tiny_model("llama", dtype=torch.float32))
    other = tiny_model("llama", dtype=torch.float32)
    with torch.no_grad():
        other.model.layers[0].self_attn.q_proj.weight[0] *= -1  # only an int8 weight differs
    b = quantize_int8(other)
    assert draft_head.model_fingerprint(a) != draft_head.model_fingerprint(b)  # collect manifests, resumes
    with_head = quantize_int8(tiny_model("llama", dtype=torch.float32), lm_head=True)
    with pytest.raises(ValueError, match="a draft head trains on a float LM head"):
        head_examples(with_head, [([1, 2, 3, 4], 2)], depth=2)
    with pytest.raises(ValueError, match="a draft head trains on a float LM head"):
        fit_head(with_head, torch.zeros(1, 32), torch.zeros(1, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long))


def test_an_int8_model_on_the_reference_path_still_decodes_as_its_generate():
    # without the native kernels linear_int8 runs its float64 reference, in HF's generate and in cllm_rt alike
    model = quantize_int8(tiny_model("llama"))
    ids, mask = random_prompts(2, [4, 7])
    ops.use_native_kernels(False)
    try:
        want = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12, pad_token_id=0)
        got = cllm_rt.generate(model, ids, mask, max_new_tokens=12, block_size=8, pad_token_id=0)
    finally:
        ops.use_native_kernels(True)
    torch.testing.assert_close(got.sequences, want, rtol=0, atol=0)
