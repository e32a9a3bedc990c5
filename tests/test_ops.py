"""cllm_rt.ops against float64 references, on CPU and (when present) CUDA.

Tolerances: jacobi_verify is exact (argmax has no arithmetic). block_attention is
compared with the reference run in float64 on the same (already rounded) inputs;
the bound per dtype is a few units of the output dtype's rounding plus float32
accumulation (ATTENTION_TOL). lm_head_argmax accumulates in float32 (float64 for
float64): its tokens must equal the float64 reference's wherever the reference's
top-2 logit gap exceeds LM_HEAD_GAP, far above float32 accumulation error.
"""
import pytest
import torch

from cllm_rt import ops

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
ATTENTION_TOL = {  # dtype: (atol, rtol)
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
LM_HEAD_GAP = 1e-3
all_dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=[str(d).removeprefix("torch.")
                                                           for d in DTYPES])


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    # Queried when a test runs, never at collection: collecting must not touch a GPU.
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA not available")
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def seed(two_threads):  # two threads: the kernels' parallel split must be exercised too
    torch.manual_seed(0)


# ---------------------------------------------------------------- jacobi_verify

def _block_with_prefix(greedy, accepted_minus_one):
    """Tokens whose first accepted_minus_one[b] guesses match greedy, then a miss."""
    B, n = greedy.shape
    block = torch.randint(0, 1 << 20, (B, n), device=greedy.device)
    block[:, 1:] = greedy[:, :-1]
    for b, k in enumerate(accepted_minus_one):
        if k + 1 < n:
            block[b, k + 1] = greedy[b, k] + 1
    return block


def _check_jacobi(logits, block):
    greedy, accepted = ops.jacobi_verify(logits, block)
    ref_greedy, ref_accepted = ops.jacobi_verify_reference(logits.cpu(), block.cpu())
    assert greedy.dtype == accepted.dtype == torch.int64
    assert torch.equal(greedy.cpu(), ref_greedy)
    assert torch.equal(accepted.cpu(), ref_accepted)
    return accepted


@all_dtypes
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 3, 5), (3, 16, 32000), (4, 32, 127),
                                   (2, 5, 33), (1, 7, 1001)])
def test_jacobi_verify_random(device, dtype, shape):
    logits = torch.randn(shape, device=device).to(dtype)
    B, n, _ = shape
    stops = torch.randint(0, n, (B,)).tolist()
    block = _block_with_prefix(logits.argmax(-1), stops)
    accepted = _check_jacobi(logits, block)
    assert accepted.cpu().tolist() == [k + 1 for k in stops]


@all_dtypes
def test_jacobi_verify_ties_nan_inf_zero(device, dtype):
    B, n, V = 2, 8, 300
    # Few distinct values: every row has many ties for its maximum.
    logits = torch.randint(-2, 3, (B, n, V), device=device).to(dtype)
    nan, inf = float("nan"), float("inf")
    logits[0, 1, 170] = nan                # NaN wins over larger values before it
    logits[0, 2, [5, 250]] = nan           # the first NaN counts
    logits[0, 3, 299] = nan                # NaN in the vectorized loop's tail
    logits[0, 4] = nan
    logits[0, 5] = -inf                    # all -inf: index 0
    logits[0, 6, [40, 90]] = inf
    logits[1, 0] = 0.0
    logits[1, 0, :7] = -0.0                # -0.0 == 0.0: index 0
    logits[1, 1] = -1.0
    logits[1, 1, [100, 64, 63]] = -0.0     # equal maxima in different lanes
    logits[1, 2, :] = -inf
    logits[1, 2, 299] = nan
    block = _block_with_prefix(logits.argmax(-1), [3, n - 1])
    _check_jacobi(logits, block)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_jacobi_verify_strided_logits(device, dtype):
    big = torch.randn(3, 20, 1000, device=device).to(dtype)
    rows = big[:, 4:20:2, :]                # strided rows, contiguous last dim
    columns = big[:, :8, ::2]               # last dim strided: the wrapper copies
    for logits in (rows, columns):
        block = _block_with_prefix(logits.argmax(-1), [1, 7, 0])
        _check_jacobi(logits, block)


# ---------------------------------------------------------------- block_attention

ATTENTION_CASES = [  # B, Hq, Hkv, n, D, cache_lens, q_transposed
    (3, 8, 2, 16, 128, [0, 97, 1025], True),
    (2, 4, 4, 3, 59, [5, 300], False),
    (1, 8, 1, 32, 256, [700], True),
    (2, 16, 2, 1, 64, [0, 31], False),
    (2, 4, 1, 32, 128, [129, 1], False),
]


def _attention_inputs(B, Hq, Hkv, n, D, cache_lens, q_transposed, dtype, device):
    if q_transposed:  # [B, n, Hq, D] viewed as [B, Hq, n, D], as a model produces it
        q = torch.randn(B, n, Hq, D, device=device).to(dtype).transpose(1, 2)
    else:
        q = torch.randn(B, Hq, n, D, device=device).to(dtype)
    lens = torch.tensor(cache_lens, device=device)
    S_max = max(cache_lens) + n + 7
    k = torch.randn(B, Hkv, S_max, D, device=device).to(dtype)
    v = torch.randn(B, Hkv, S_max, D, device=device).to(dtype)
    # Past each row's block: large values that would show if unmasked; past the
    # longest row: NaN, which must never be read.
    for b, c in enumerate(cache_lens):
        k[b, :, c + n:] = 300
        v[b, :, c + n:] = 1e4
    k[:, :, max(cache_lens) + n:] = float("nan")
    v[:, :, max(cache_lens) + n:] = float("nan")
    return q, k, v, lens


def _attention_reference64(q, k, v, lens, scale=None):
    L = int(lens.max()) + q.shape[2]  # drop the NaN tail, which no query sees
    return ops.block_attention_reference(q.double().cpu(), k[:, :, :L].double().cpu(),
                                         v[:, :, :L].double().cpu(), lens.cpu(), scale)


@all_dtypes
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "B{}-H{}/{}-n{}-D{}".format(*c))
def test_block_attention(device, dtype, case):
    q, k, v, lens = _attention_inputs(*case, dtype, device)
    out = ops.block_attention(q, k, v, lens)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    atol, rtol = ATTENTION_TOL[dtype]
    torch.testing.assert_close(out.double().cpu(), _attention_reference64(q, k, v, lens),
                               atol=atol, rtol=rtol)


@pytest.mark.parametrize("lens_dtype", [torch.int32, torch.int64])
def test_block_attention_scale_and_int32_lens(device, lens_dtype):
    q, k, v, lens = _attention_inputs(2, 6, 3, 5, 32, [10, 40], False, torch.float32, device)
    out = ops.block_attention(q, k, v, lens.to(lens_dtype), scale=0.3)
    torch.testing.assert_close(out.double().cpu(), _attention_reference64(q, k, v, lens, 0.3),
                               atol=2e-5, rtol=2e-5)


# ---------------------------------------------------------------- lm_head_argmax

@all_dtypes
@pytest.mark.parametrize("shape", [(2, 3, 77, 1000), (1, 16, 256, 5003), (3, 1, 64, 33),
                                   (1, 2, 8, 1)])
def test_lm_head_argmax(device, dtype, shape):
    B, n, d, V = shape
    hidden = torch.randn(B, n, d, device=device).to(dtype)
    weight = torch.randn(V, d, device=device).to(dtype)
    greedy = ops.lm_head_argmax(hidden, weight)
    assert greedy.shape == (B, n) and greedy.dtype == torch.int64
    logits = hidden.double().cpu() @ weight.double().cpu().T
    reference = logits.argmax(-1)
    if dtype == torch.float64:
        assert torch.equal(greedy.cpu(), reference)
    else:
        top2 = logits.topk(min(2, V), -1).values
        clear = (top2[..., 0] - top2[..., -1] > LM_HEAD_GAP) | (V == 1)
        assert torch.equal(greedy.cpu()[clear], reference[clear])
        assert clear.float().mean() > 0.9


def test_lm_head_argmax_nan_row(device):
    hidden = torch.randn(1, 3, 16, device=device)
    hidden[0, 1, 4] = float("nan")
    weight = torch.randn(40, 16, device=device)
    greedy = ops.lm_head_argmax(hidden, weight)
    assert torch.equal(greedy.cpu(), ops.lm_head_argmax_reference(hidden.cpu(), weight.cpu()))


# ---------------------------------------------------------------- bad inputs

def _jacobi_args(device, **change):
    args = {"logits": torch.randn(2, 4, 10, device=device),
            "block": torch.zeros(2, 4, dtype=torch.int64, device=device)}
    args.update(change)
    return args


def _attention_args(device, **change):
    q, k, v, lens = _attention_inputs(2, 8, 2, 4, 16, [3, 10], False, torch.float32, device)
    args = {"q": q, "k_cache": k, "v_cache": v, "cache_lens": lens}
    args.update(change)
    return args


def _lm_head_args(device, **change):
    args = {"hidden": torch.randn(2, 3, 8, device=device),
            "weight": torch.randn(20, 8, device=device)}
    args.update(change)
    return args


BAD_INPUTS = [  # op, argument builder, changes, error, message fragment
    ("jacobi_verify", _jacobi_args, {"logits": torch.randn(4, 10)}, ValueError, "logits"),
    ("jacobi_verify", _jacobi_args, {"logits": torch.zeros(2, 4, 10, dtype=torch.int64)},
     TypeError, "logits"),
    ("jacobi_verify", _jacobi_args, {"block": torch.zeros(2, 4, dtype=torch.int32)},
     TypeError, "block"),
    ("jacobi_verify", _jacobi_args, {"block": torch.zeros(2, 5, dtype=torch.int64)},
     ValueError, "block"),
    ("jacobi_verify", _jacobi_args, {"logits": [[[0.0]]]}, TypeError, "logits"),
    ("jacobi_verify", _jacobi_args, {"logits": torch.randn(2, 4, 0)}, ValueError, "logits"),
    ("block_attention", _attention_args, {"q": torch.randn(2, 8, 4)}, ValueError, "q"),
    ("block_attention", _attention_args, {"k_cache": torch.randn(2, 2, 20, 16).double()},
     TypeError, "k_cache"),
    ("block_attention", _attention_args, {"v_cache": torch.randn(2, 2, 16, 20).transpose(2, 3)},
     ValueError, "v_cache"),
    ("block_attention", _attention_args, {"k_cache": torch.randn(2, 3, 21, 16),
                                          "v_cache": torch.randn(2, 3, 21, 16)},
     ValueError, "multiple"),
    ("block_attention", _attention_args, {"cache_lens": torch.tensor([3, 18])},
     ValueError, "cache_lens"),
    ("block_attention", _attention_args, {"cache_lens": torch.tensor([-1, 3])},
     ValueError, "cache_lens"),
    ("block_attention", _attention_args, {"cache_lens": torch.tensor([3.0, 4.0])},
     TypeError, "cache_lens"),
    ("block_attention", _attention_args, {"cache_lens": torch.tensor([3])},
     ValueError, "cache_lens"),
    ("block_attention", _attention_args, {"q": torch.randn(2, 8, 4, 300),
                                          "k_cache": torch.randn(2, 2, 21, 300),
                                          "v_cache": torch.randn(2, 2, 21, 300)},
     ValueError, "D <= 256"),
    ("lm_head_argmax", _lm_head_args, {"weight": torch.randn(20, 9)}, ValueError, "weight"),
    ("lm_head_argmax", _lm_head_args, {"weight": torch.randn(20, 8).double()},
     TypeError, "weight"),
    ("lm_head_argmax", _lm_head_args, {"hidden": torch.randn(6, 8)}, ValueError, "hidden"),
]


@pytest.mark.parametrize("op, make_args, change, error, fragment", BAD_INPUTS,
                         ids=[f"{case[0]}-{i}" for i, case in enumerate(BAD_INPUTS)])
def test_bad_inputs(op, make_args, change, error, fragment):
    args = make_args("cpu", **change)
    with pytest.raises(error, match=fragment):
        getattr(ops, op)(**args)


def test_wrong_device_raises():
    args = _jacobi_args("cpu", block=torch.zeros(2, 4, dtype=torch.int64, device="meta"))
    with pytest.raises(ValueError, match="block must be on logits's device"):
        ops.jacobi_verify(**args)


# ---------------------------------------------------------------- registration

@pytest.mark.skipif(not ops.native_available(), reason="native extension not built")
def test_opcheck(device):
    logits = torch.randn(2, 3, 50, device=device)
    block = torch.randint(0, 50, (2, 3), device=device)
    q, k, v, lens = _attention_inputs(2, 4, 2, 3, 16, [4, 9], True, torch.float32, device)
    hidden, weight = torch.randn(2, 3, 8, device=device), torch.randn(30, 8, device=device)
    torch.library.opcheck(torch.ops.cllm_rt.jacobi_verify.default, (logits, block))
    torch.library.opcheck(torch.ops.cllm_rt.block_attention.default, (q, k, v, lens, 0.25))
    torch.library.opcheck(torch.ops.cllm_rt.lm_head_argmax.default, (hidden, weight))
