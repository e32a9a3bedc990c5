"""Routing a model's linear layers to ops.linear where it pays (ops.linear_pays), and only there."""

import pytest
import torch
import torch.nn.functional as F

from cllm_rt import ops
from cllm_rt.runtime.linears import routed_linears
from tiny_models import tiny_model

pair_dot = pytest.mark.skipif(not (ops.native_available() and ops._C.BF16_PAIR_DOT),
                              reason="the extension was built without the AVX512-BF16 linear kernel")


@pair_dot
def test_linear_pays_for_few_bf16_rows_on_a_cpu_only(monkeypatch):
    x = torch.randn(ops.PAIR_DOT_MAX_ROWS, 16, dtype=torch.bfloat16)
    assert ops.linear_pays(x) and ops.linear_pays(x[:1])
    monkeypatch.setattr(ops, "cpu_has_amx_bf16", lambda: True)  # torch's AMX GEMM from 4 rows
    assert not ops.linear_pays(torch.randn(ops.PAIR_DOT_MAX_ROWS + 1, 16, dtype=torch.bfloat16))
    monkeypatch.setattr(ops, "_native_kernels_enabled", False)
    assert not ops.linear_pays(x)


@pytest.mark.skipif(not ops.native_available(), reason="native extension not built")
@pytest.mark.parametrize("amx", [False, True], ids=["no_amx", "amx"])
def test_bf16_trees_route_where_the_cpu_has_no_amx(amx, monkeypatch):
    monkeypatch.setattr(ops, "cpu_has_amx_bf16", lambda: amx)
    for rows in (2, ops.LINEAR_MIN_ROWS, ops.LINEAR_MAX_ROWS):
        tree = torch.randn(rows, 16, dtype=torch.bfloat16)
        pair_dot_rows = bool(ops._C.BF16_PAIR_DOT) and rows <= ops.PAIR_DOT_MAX_ROWS
        assert ops.linear_pays(tree) == (not amx or pair_dot_rows)
    assert not ops.linear_pays(torch.randn(ops.LINEAR_MAX_ROWS + 1, 16, dtype=torch.bfloat16))


@pytest.mark.skipif(not ops.native_available(), reason="native extension not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_pays_for_a_tree_s_rows_not_a_token_s_or_a_prompt_s(dtype, monkeypatch):
    def x(*shape):
        return torch.randn(*shape, 16, dtype=dtype)
    assert ops.linear_pays(x(ops.LINEAR_MIN_ROWS)) and ops.linear_pays(x(ops.LINEAR_MAX_ROWS))
    assert ops.linear_pays(x(2, ops.LINEAR_MIN_ROWS // 2))  # rows = batch x tokens
    assert not ops.linear_pays(x(1, 1)) and not ops.linear_pays(x(ops.LINEAR_MIN_ROWS - 1))
    assert not ops.linear_pays(x(1, ops.LINEAR_MAX_ROWS + 1))
    assert not ops.linear_pays(x(ops.LINEAR_MIN_ROWS).half())
    monkeypatch.setattr(ops, "_native_kernels_enabled", False)
    assert not ops.linear_pays(x(ops.LINEAR_MIN_ROWS))


@pair_dot
def test_a_bf16_model_routes_few_rows_and_is_restored():
    model = tiny_model("llama", dtype=torch.bfloat16)
    layer = model.model.layers[0].self_attn.q_proj
    few, many = torch.randn(1, 2, 32, dtype=torch.bfloat16), torch.randn(1, 5, 32, dtype=torch.bfloat16)
    with routed_linears(model):
        assert torch.equal(layer(few), ops.linear(few, [layer.weight], [layer.bias])[0])
        assert torch.equal(layer(many), F.linear(many, layer.weight, layer.bias))
    assert "forward" not in vars(layer)
    assert torch.equal(layer(few), F.linear(few, layer.weight, layer.bias))


@pytest.mark.skipif(not ops.native_available(), reason="native extension not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_float_model_routes_a_tree_s_rows_and_keeps_torch_for_one_token(dtype):
    model = tiny_model("llama", dtype=dtype)
    layer = model.model.layers[0].mlp.down_proj
    K = layer.in_features
    one, tree = torch.randn(1, 1, K, dtype=dtype), torch.randn(1, ops.LINEAR_MIN_ROWS, K, dtype=dtype)
    with routed_linears(model):
        assert torch.equal(layer(tree), ops.linear(tree, [layer.weight], [layer.bias])[0])
        assert torch.equal(layer(one), F.linear(one, layer.weight, layer.bias))
    assert not any("forward" in vars(m) for m in model.modules())
