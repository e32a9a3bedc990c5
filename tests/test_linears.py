"""Routing a bf16 model's linear layers to ops.linear for few rows, and only there."""

import pytest
import torch
import torch.nn.functional as F

from cllm_rt import ops
from cllm_rt.runtime.linears import routed_linears
from tiny_models import tiny_model

pair_dot = pytest.mark.skipif(not (ops.native_available() and ops._C.BF16_PAIR_DOT),
                              reason="the extension was built without the AVX512-BF16 linear kernel")


@pair_dot
def test_pair_dot_pays_for_few_bf16_rows_on_a_cpu_only(monkeypatch):
    x = torch.randn(ops.PAIR_DOT_MAX_ROWS, 16, dtype=torch.bfloat16)
    assert ops.pair_dot_pays(x) and ops.pair_dot_pays(x[:1])
    assert not ops.pair_dot_pays(torch.randn(ops.PAIR_DOT_MAX_ROWS + 1, 16, dtype=torch.bfloat16))
    assert not ops.pair_dot_pays(x.float()) and not ops.pair_dot_pays(x.double())
    monkeypatch.setattr(ops, "_native_kernels_enabled", False)
    assert not ops.pair_dot_pays(x)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_other_dtypes_keep_torch_s_linear(dtype):
    model = tiny_model("llama", dtype=dtype)
    with routed_linears(model):
        assert not any("forward" in vars(m) for m in model.modules())
