"""cllm_rt.ops against float64 references, on CPU and (when present) CUDA.

Tolerances: jacobi_verify and tree_verify are exact (no arithmetic). block_attention
and tree_attention are compared with the reference run in float64 on the same
(already rounded) inputs; the bound per dtype is a few units of the output dtype's
rounding plus float32 accumulation (ATTENTION_TOL). lm_head_argmax accumulates in
float32 (float64 for float64): its tokens must equal the float64 reference's wherever
the reference's top-2 logit gap exceeds LM_HEAD_GAP, far above float32 accumulation
error.

The `device` fixture insists that the op runs a native kernel there: otherwise a
test would compare the reference with itself and could not fail.
"""
import os

import pytest
import torch
import torch.nn.functional as F

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
    device = torch.device(request.param)
    if not ops.native_kernel_for(device):
        if os.environ.get("CLLM_RT_ALLOW_FALLBACK") == "1":
            pytest.skip(f"no native kernels for {device}: the reference would be compared with itself")
        pytest.fail(f"cllm_rt has no native kernels for {device}: the extension did not build "
                    "(or was built without CUDA); CLLM_RT_ALLOW_FALLBACK=1 skips these tests")
    return device


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
    (1, 4, 2, 200, 64, [0], False),       # a prefill: many row blocks, causally cut key ranges
    (1, 8, 8, 1, 128, [3000], True),      # a long decode: many key splits on a GPU
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


def test_block_attention_empty_batch(device):
    q, k, v, lens = _attention_inputs(1, 4, 2, 3, 16, [5], False, torch.float32, device)
    out = ops.block_attention(q[:0], k[:0], v[:0], lens[:0])
    assert out.shape == (0, 4, 3, 16)


def test_bad_cache_lens_values_are_rejected_on_every_device(device):
    q, k, v, lens = _attention_inputs(2, 4, 2, 3, 16, [5, 9], False, torch.float32, device)
    ops.block_attention(q, k, v, lens)
    # An in-place write to a tensor already checked must be checked again (CUDA
    # remembers checked tensors by identity and version: one host sync per tensor).
    lens[1] = k.shape[2] - 2
    with pytest.raises(ValueError, match=r"cache_lens\[b\] \+ n <= S_max"):
        ops.block_attention(q, k, v, lens)
    with pytest.raises(ValueError, match="got values in \\[-1, 5\\]"):
        ops.block_attention(q, k, v, torch.tensor([5, -1], device=device))


SMALL_SHARED_MEMORY = [  # dtype, D, CLLM_RT_CUDA_SMEM_LIMIT -> the plan it forces (attention_plan.h)
    (torch.bfloat16, 256, 40000),   # 8 rows per block, K and V sharing one buffer
    (torch.bfloat16, 256, 45000),   # 8 rows per block, separate buffers
    (torch.float32, 128, 40000),    # 32 rows per block, one shared buffer
]


@pytest.mark.parametrize("dtype, D, limit", SMALL_SHARED_MEMORY,
                         ids=[f"{str(c[0]).removeprefix('torch.')}-D{c[1]}-{c[2]}" for c in SMALL_SHARED_MEMORY])
def test_attention_small_shared_memory(device, dtype, D, limit, monkeypatch):
    # The plans GPUs with less shared memory than this one (T4, sm_86/89) would run.
    if device.type != "cuda":
        pytest.skip("shared-memory plans are CUDA's")
    monkeypatch.setenv("CLLM_RT_CUDA_SMEM_LIMIT", str(limit))
    q, k, v, lens = _attention_inputs(2, 8, 2, 37, D, [3, 300], True, dtype, device)
    parents = _random_parents([37, 20], 37).to(device)
    L = int(lens.max()) + 37
    k64, v64 = k[:, :, :L].double().cpu(), v[:, :, :L].double().cpu()
    atol, rtol = ATTENTION_TOL[dtype]
    torch.testing.assert_close(ops.block_attention(q, k, v, lens).double().cpu(),
                               ops.block_attention_reference(q.double().cpu(), k64, v64, lens.cpu()),
                               atol=atol, rtol=rtol)
    torch.testing.assert_close(ops.tree_attention(q, k, v, lens, parents).double().cpu(),
                               ops.tree_attention_reference(q.double().cpu(), k64, v64, lens.cpu(),
                                                            parents.cpu()), atol=atol, rtol=rtol)


def test_attention_refuses_what_shared_memory_cannot_hold(device, monkeypatch):
    if device.type != "cuda":
        pytest.skip("shared-memory plans are CUDA's")
    monkeypatch.setenv("CLLM_RT_CUDA_SMEM_LIMIT", "40000")  # float32 at D = 256 needs 41,472 B
    q, k, v, lens = _attention_inputs(1, 4, 2, 3, 256, [5], False, torch.float32, device)
    with pytest.raises(ValueError, match="shared memory"):
        ops.block_attention(q, k, v, lens)


# ---------------------------------------------------------------- paged caches

def _paged(cache, lens, n, page_size, seed=0):
    """cache [B, Hkv, S, D] as shuffled pages [num_pages, Hkv, page_size, D] and its page table [B, pages]:
    row b's pages are scattered among the pool (with spare pages of NaN no row owns), so a kernel that
    ignored the table would read another row's keys or NaN."""
    B, Hkv, S, D = cache.shape
    pages = -(-(int(lens.max()) + n) // page_size)
    dense = torch.full((B, Hkv, pages * page_size, D), float("nan"), dtype=cache.dtype, device=cache.device)
    dense[:, :, :min(S, pages * page_size)] = cache[:, :, :pages * page_size]
    num_pages = B * pages + 3
    order = torch.randperm(num_pages, generator=torch.Generator().manual_seed(seed))
    table = order[:B * pages].view(B, pages).to(cache.device)
    pool = torch.full((num_pages, Hkv, page_size, D), float("nan"), dtype=cache.dtype, device=cache.device)
    pool[table] = dense.view(B, Hkv, pages, page_size, D).transpose(1, 2)
    return pool, table


PAGED_CASES = [  # B, Hq, Hkv, n, D, cache_lens, q_transposed, page_size
    (3, 8, 2, 16, 128, [0, 97, 1025], True, 64),
    (2, 4, 4, 3, 59, [5, 300], False, 32),
    (2, 16, 2, 1, 64, [0, 31], False, 32),    # a row of one page, a row ending at a page's end
    (1, 4, 2, 200, 64, [0], False, 96),       # a prefill over several pages
    (1, 8, 8, 1, 128, [3000], True, 128),     # a long decode: many key splits on a GPU
]


@all_dtypes
@pytest.mark.parametrize("tree", [False, True], ids=["block", "tree"])
@pytest.mark.parametrize("case", PAGED_CASES, ids=lambda c: "B{}-H{}/{}-n{}-D{}-P{}".format(*c[:5], c[7]))
def test_paged_attention(device, dtype, tree, case):
    *shape, page_size = case
    q, k, v, lens = _attention_inputs(*shape, dtype, device)
    n = q.shape[2]
    k_pages, table = _paged(k, lens, n, page_size)
    v_pages, _ = _paged(v, lens, n, page_size)
    L = int(lens.max()) + n
    k64, v64, q64 = k[:, :, :L].double().cpu(), v[:, :, :L].double().cpu(), q.double().cpu()
    if tree:
        if n > 64:
            pytest.skip("a prefill is a chain: trees have at most 64 nodes")
        parents = _random_parents([n] * q.shape[0], n).to(device)
        out = ops.tree_attention(q, k_pages, v_pages, lens, parents, page_table=table)
        reference = ops.tree_attention_reference(q64, k64, v64, lens.cpu(), parents.cpu())
    else:
        out = ops.block_attention(q, k_pages, v_pages, lens, page_table=table)
        reference = ops.block_attention_reference(q64, k64, v64, lens.cpu())
    assert out.shape == q.shape and out.dtype == dtype
    atol, rtol = ATTENTION_TOL[dtype]
    torch.testing.assert_close(out.double().cpu(), reference, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_paged_attention_with_the_dense_tile_is_the_dense_result(device, dtype):
    # Pages of 128 positions cut the keys where the dense kernels' tiles do (CPU: 128 keys, CUDA: 32), so
    # the same products and softmax steps run in the same order: bit-identical outputs.
    q, k, v, lens = _attention_inputs(2, 8, 2, 21, 64, [0, 300], True, dtype, device)
    k_pages, table = _paged(k, lens, 21, 128)
    v_pages, _ = _paged(v, lens, 21, 128)
    assert torch.equal(ops.block_attention(q, k_pages, v_pages, lens, page_table=table),
                       ops.block_attention(q, k, v, lens))


def test_paged_reference_unpages(device):
    q, k, v, lens = _attention_inputs(2, 4, 2, 5, 16, [40, 3], False, torch.float64, device)
    k_pages, table = _paged(k, lens, 5, 32)
    dense = ops.unpage(k_pages, table)
    assert torch.equal(dense[:, :, :45], k[:, :, :45])


def test_opcheck_paged(device):
    q, k, v, lens = _attention_inputs(2, 4, 2, 3, 16, [40, 9], True, torch.float32, device)
    k_pages, table = _paged(k, lens, 3, 32)
    v_pages, _ = _paged(v, lens, 3, 32)
    parents = torch.tensor([[-1, 0, 0], [-1, 0, 1]], device=device)
    torch.library.opcheck(torch.ops.cllm_rt.block_attention.default, (q, k_pages, v_pages, lens, 0.25, table))
    torch.library.opcheck(torch.ops.cllm_rt.tree_attention.default,
                          (q, k_pages, v_pages, lens, parents, 0.25, table))


# ---------------------------------------------------------------- tree_attention

def _random_parents(real_nodes, n, forest=False):
    """[len(real_nodes), n] parents: row b a random tree on its first real_nodes[b] nodes
    (half the nodes extend their predecessor, so deep chains occur), then padding roots.
    forest: some nodes start new trees."""
    rows = []
    for m in real_nodes:
        parents = [-1]
        for i in range(1, m):
            u = float(torch.rand(()))
            parents.append(-1 if forest and u < 0.15 else i - 1 if u < 0.5 else
                           int(torch.randint(0, i, ())))
        rows.append(parents + [-1] * (n - m))
    return torch.tensor(rows)


def _ancestors_brute(parents):
    B, n = parents.shape
    out = torch.zeros(B, n, n, dtype=torch.bool)
    for b in range(B):
        for i in range(n):
            j = i
            while j >= 0:
                out[b, i, j] = True
                j = int(parents[b, j])
    return out


TREE_CASES = [  # B, Hq, Hkv, n, D, cache_lens, q_transposed, real nodes per row, forest
    (3, 8, 2, 13, 64, [0, 97, 300], True, [13, 7, 1], False),
    (2, 4, 4, 64, 59, [5, 130], False, [64, 40], True),
    (1, 12, 4, 5, 128, [33], True, [5], False),
    (2, 2, 1, 31, 256, [129, 0], False, [31, 31], True),
]


def test_tree_ancestors_reference():
    parents = _random_parents([40, 17, 1], 40, forest=True)
    assert torch.equal(ops.tree_ancestors(parents), _ancestors_brute(parents))


@all_dtypes
@pytest.mark.parametrize("case", TREE_CASES, ids=lambda c: "B{}-H{}/{}-n{}-D{}".format(*c))
def test_tree_attention(device, dtype, case):
    *shape, real_nodes, forest = case
    q, k, v, lens = _attention_inputs(*shape, dtype, device)
    parents = _random_parents(real_nodes, shape[3], forest).to(device)
    out = ops.tree_attention(q, k, v, lens, parents)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    L = int(lens.max()) + q.shape[2]  # drop the NaN tail, which no query sees
    reference = ops.tree_attention_reference(q.double().cpu(), k[:, :, :L].double().cpu(),
                                             v[:, :, :L].double().cpu(), lens.cpu(), parents.cpu())
    atol, rtol = ATTENTION_TOL[dtype]
    torch.testing.assert_close(out.double().cpu(), reference, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_tree_attention_chain_is_block_attention(device, dtype):
    q, k, v, lens = _attention_inputs(2, 8, 2, 21, 64, [0, 77], True, dtype, device)
    chain = (torch.arange(21, device=device) - 1).expand(2, 21).contiguous()
    # One kernel with two masks that hide the same keys: bit-identical outputs.
    assert torch.equal(ops.tree_attention(q, k, v, lens, chain), ops.block_attention(q, k, v, lens))
    k, v = k[:, :, :98], v[:, :, :98]  # the references read every position: no NaN tail
    assert torch.equal(ops.tree_attention_reference(q, k, v, lens, chain),
                       ops.block_attention_reference(q, k, v, lens))


def test_tree_attention_int32_lens_and_scale(device):
    q, k, v, lens = _attention_inputs(2, 6, 3, 7, 32, [10, 40], False, torch.float32, device)
    parents = _random_parents([7, 4], 7).to(device)
    out = ops.tree_attention(q, k, v, lens.int(), parents, scale=0.3)
    reference = ops.tree_attention_reference(q.double().cpu(), k[:, :, :47].double().cpu(),
                                             v[:, :, :47].double().cpu(), lens.cpu(), parents.cpu(), 0.3)
    torch.testing.assert_close(out.double().cpu(), reference, atol=2e-5, rtol=2e-5)


def test_tree_attention_empty_batch(device):
    q, k, v, lens = _attention_inputs(1, 4, 2, 3, 16, [5], False, torch.float32, device)
    parents = torch.tensor([[-1, 0, 0]], device=device)
    assert ops.tree_attention(q[:0], k[:0], v[:0], lens[:0], parents[:0]).shape == (0, 4, 3, 16)


# ---------------------------------------------------------------- tree_verify

def _tree_verify_brute(greedy, tokens, parents):
    """Per row: walk every node up to its root, so nothing is shared with the reference's pass."""
    accepted, nodes, paths = [], [], []
    for g, t, p in zip(greedy.tolist(), tokens.tolist(), parents.tolist()):
        best = (0, [0])
        for i in range(len(p)):
            path, j = [i], i
            while p[j] >= 0 and t[j] == g[p[j]]:
                j = p[j]
                path.append(j)
            if p[j] < 0 and j == 0 and len(path) > len(best[1]):
                best = (i, path[::-1])
        nodes.append(best[0])
        accepted.append(len(best[1]))
        paths.append(best[1] + [-1] * (len(p) - len(best[1])))
    return torch.tensor(accepted), torch.tensor(nodes), torch.tensor(paths)


def _check_tree_verify(greedy, tokens, parents):
    accepted, node, path = ops.tree_verify(greedy, tokens, parents)
    assert accepted.dtype == node.dtype == path.dtype == torch.int64
    assert node.shape == accepted.shape == greedy.shape[:1] and path.shape == greedy.shape
    expected = _tree_verify_brute(greedy.cpu(), tokens.cpu(), parents.cpu())
    for got, want in zip((accepted, node, path), expected):
        assert torch.equal(got.cpu(), want)
    for got, want in zip(ops.tree_verify_reference(greedy.cpu(), tokens.cpu(), parents.cpu()), expected):
        assert torch.equal(got, want)
    return accepted


@pytest.mark.parametrize("n", [1, 7, 64])
def test_tree_verify_random(device, n):
    B = 9
    parents = _random_parents([n] * 4 + [max(1, n // 2)] * 3 + [1, n], n, forest=n > 7).to(device)
    # A vocabulary of 3: about a third of the edges match, so depths vary.
    greedy = torch.randint(0, 3, (B, n), device=device)
    tokens = torch.randint(0, 3, (B, n), device=device)
    accepted = _check_tree_verify(greedy, tokens, parents)
    if n == 64:
        assert accepted.max() > 2  # some row got deep


def test_tree_verify_ties_and_padding(device):
    parents = torch.tensor([[-1, 0, 0, 1, 2, -1], [-1, 0, 0, 1, 2, -1], [-1, -1, 1, -1, -1, -1]])
    greedy = torch.tensor([[5, 7, 7, 1, 1, 1], [5, 7, 7, 1, 1, 1], [5, 5, 5, 5, 5, 5]])
    tokens = torch.tensor([[9, 5, 5, 7, 7, 5], [9, 4, 4, 4, 4, 4], [9, 5, 5, 5, 5, 5]])
    accepted, node, path = ops.tree_verify(greedy.to(device), tokens.to(device), parents.to(device))
    # Row 0: nodes 3 and 4 are both confirmed at depth 2: the smaller index wins.
    # Row 1: nothing matches. Row 2: node 1 matches greedy[0] but is a root (padding):
    # neither it nor its child 2 are ever accepted.
    assert accepted.tolist() == [3, 1, 1] and node.tolist() == [3, 0, 0]
    assert path.tolist() == [[0, 1, 3, -1, -1, -1], [0, -1, -1, -1, -1, -1], [0, -1, -1, -1, -1, -1]]
    _check_tree_verify(greedy.to(device), tokens.to(device), parents.to(device))


def test_tree_verify_chain_is_jacobi_verify(device):
    B, n, V = 5, 16, 50
    logits = torch.randn(B, n, V, device=device)
    block = _block_with_prefix(logits.argmax(-1), [0, 3, 15, 7, 1])
    greedy, jacobi_accepted = ops.jacobi_verify(logits, block)
    chain = (torch.arange(n, device=device) - 1).expand(B, n).contiguous()
    accepted, node, path = ops.tree_verify(greedy, block, chain)
    assert torch.equal(accepted, jacobi_accepted)
    assert torch.equal(accepted.cpu(), ops.accepted_length(block, greedy).cpu())
    assert torch.equal(node, accepted - 1)
    k = torch.arange(n, device=device)
    assert torch.equal(path, torch.where(k < accepted[:, None], k, -1))


# ---------------------------------------------------------------- greedy_verify

@pytest.mark.parametrize("rows", [(1, 1), (2, 3), (1, 8), (3, 16)], ids=lambda r: "B{}-n{}".format(*r))
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_greedy_verify(device, rows, with_bias, monkeypatch):
    B, n = rows
    d, V = 32, 301
    # float64: the fused head and the linear layer cannot round an argmax apart.
    hidden = torch.randn(B, n, d, device=device, dtype=torch.float64)
    weight = torch.randn(V, d, device=device, dtype=torch.float64)
    bias = torch.randn(V, device=device, dtype=torch.float64) if with_bias else None
    logits = F.linear(hidden, weight, bias)
    block = _block_with_prefix(logits.argmax(-1), torch.randint(0, n, (B,)).tolist())
    fused_calls = []
    fused = ops.lm_head_argmax
    monkeypatch.setattr(ops, "lm_head_argmax", lambda h, w: fused_calls.append(1) or fused(h, w))
    greedy, accepted = ops.greedy_verify(hidden, weight, bias, block)
    expected = ops.jacobi_verify_reference(logits.cpu(), block.cpu())
    assert torch.equal(greedy.cpu(), expected[0]) and torch.equal(accepted.cpu(), expected[1])
    # ops.linear where it pays (it beats the fused head there), else fused from FUSED_HEAD_MIN_ROWS rows
    fuses = (bias is None and device.type == "cpu" and B * n >= ops.FUSED_HEAD_MIN_ROWS
             and not ops.linear_pays(hidden))
    assert bool(fused_calls) == fuses


@pytest.mark.parametrize("amx", [False, True], ids=["no_amx", "amx"])
def test_greedy_verify_keeps_bf16_on_the_linear_layer_where_the_cpu_has_amx(amx, monkeypatch):
    hidden, weight = torch.randn(2, 8, 16, dtype=torch.bfloat16), torch.randn(40, 16, dtype=torch.bfloat16)
    block = torch.zeros(2, 8, dtype=torch.int64)
    monkeypatch.setattr(ops, "cpu_has_amx_bf16", lambda: amx)
    fused_calls = []
    fused = ops.lm_head_argmax
    monkeypatch.setattr(ops, "lm_head_argmax", lambda h, w: fused_calls.append(1) or fused(h, w))
    greedy, _ = ops.greedy_verify(hidden, weight, None, block)
    # without AMX ops.linear where it pays (16 rows, a tree's), else fused; with AMX torch's linear layer
    assert bool(fused_calls) == (not amx and not ops.linear_pays(hidden))
    if amx:  # the linear layer's bf16 logits, as HF's bf16 generate compares them
        assert torch.equal(greedy, F.linear(hidden, weight).argmax(-1))
    # float32 takes ops.linear where that pays, else fuses, whatever the CPU
    calls = len(fused_calls)
    ops.greedy_verify(hidden.float(), weight.float(), None, block)
    assert len(fused_calls) == calls + (not ops.linear_pays(hidden.float()))


def test_greedy_verify_checks_block():
    hidden, weight = torch.randn(2, 8, 16), torch.randn(40, 16)
    for block, error in ((torch.zeros(2, 7, dtype=torch.int64), ValueError),
                         (torch.zeros(2, 8, dtype=torch.int32), TypeError)):
        with pytest.raises(error, match="block"):
            ops.greedy_verify(hidden, weight, None, block)


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


def test_lm_head_argmax_nan_weight_rows(device):
    # NaN logits in vocabulary rows 23 and 31 of every hidden row: torch.argmax returns
    # the first NaN, 23, where a kernel that ignored NaN would return the real maximum.
    hidden = torch.randn(2, 3, 16, device=device)
    weight = torch.randn(40, 16, device=device)
    weight[23, 5] = weight[31, 0] = float("nan")
    greedy = ops.lm_head_argmax(hidden, weight)
    assert torch.equal(greedy.cpu(), torch.full((2, 3), 23))
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


def _paged_attention_args(device, **change):
    q, k, v, lens = _attention_inputs(2, 8, 2, 4, 16, [3, 40], False, torch.float32, device)
    k_pages, table = _paged(k, lens, 4, 32)
    v_pages, _ = _paged(v, lens, 4, 32)
    args = {"q": q, "k_cache": k_pages, "v_cache": v_pages, "cache_lens": lens, "page_table": table}
    args.update(change)
    return args


def _tree_attention_args(device, **change):
    args = _attention_args(device)
    args["parents"] = torch.tensor([[-1, 0, 0, 1], [-1, 0, 1, -1]], device=device)
    args.update(change)
    return args


def _tree_verify_args(device, **change):
    args = {"greedy": torch.zeros(2, 4, dtype=torch.int64, device=device),
            "tokens": torch.zeros(2, 4, dtype=torch.int64, device=device),
            "parents": torch.tensor([[-1, 0, 0, 1], [-1, 0, 1, -1]], device=device)}
    args.update(change)
    return args


def _lm_head_args(device, **change):
    args = {"hidden": torch.randn(2, 3, 8, device=device),
            "weight": torch.randn(20, 8, device=device)}
    args.update(change)
    return args


def _kv(*shape):
    return {"k_cache": torch.randn(*shape), "v_cache": torch.randn(*shape)}


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
    ("block_attention", _attention_args, _kv(2, 3, 21, 16), ValueError, "multiple"),
    ("block_attention", _attention_args, {"q": torch.randn(2, 0, 4, 16)}, ValueError, "multiple"),
    ("block_attention", _attention_args, _kv(2, 0, 21, 16), ValueError, "multiple"),
    ("block_attention", _attention_args, {"cache_lens": torch.tensor([3, 18])},
     ValueError, "cache_lens"),
    ("block_attention", _attention_args, {"cache_lens": torch.tensor([-1, 3])},
     ValueError, "cache_lens"),
    ("block_attention", _attention_args, {"cache_lens": torch.tensor([3.0, 4.0])},
     TypeError, "cache_lens"),
    ("block_attention", _attention_args, {"cache_lens": torch.tensor([3])},
     ValueError, "cache_lens"),
    ("block_attention", _attention_args, {"q": torch.randn(2, 8, 4, 300), **_kv(2, 2, 21, 300)},
     ValueError, "D <= 256"),
    ("block_attention", _paged_attention_args, {"page_table": torch.zeros(2, 2, dtype=torch.int32)},
     TypeError, "page_table"),
    ("block_attention", _paged_attention_args, {"page_table": torch.zeros(3, 2, dtype=torch.int64)},
     ValueError, "page_table"),
    ("block_attention", _paged_attention_args, {"page_table": torch.zeros(2, 0, dtype=torch.int64)},
     ValueError, "page_table"),
    ("block_attention", _paged_attention_args, {"page_table": torch.tensor([[0, 1], [2, 7]])},
     ValueError, "page_table"),    # page 7 of a pool of 7
    ("block_attention", _paged_attention_args, {"page_table": torch.tensor([[0, 1], [-1, 2]])},
     ValueError, "page_table"),
    ("block_attention", _paged_attention_args, {"cache_lens": torch.tensor([3, 61])},
     ValueError, "cache_lens"),    # 61 + 4 positions > 2 pages of 32
    ("block_attention", _paged_attention_args, _kv(7, 2, 24, 16), ValueError, "page_size"),
    ("tree_attention", _tree_attention_args, {"parents": torch.tensor([[-1, 0, 0, 1]])},
     ValueError, "parents"),
    ("tree_attention", _tree_attention_args, {"parents": torch.tensor([[-1, 0, 0, 1]] * 2).int()},
     TypeError, "parents"),
    ("tree_attention", _tree_attention_args, {"parents": torch.tensor([[-1, 0, 0, 1], [-1, 1, 1, 1]])},
     ValueError, "parents"),   # node 1 its own parent
    ("tree_attention", _tree_attention_args, {"parents": torch.tensor([[-1, 0, 3, 1], [-1, 0, 1, 2]])},
     ValueError, "parents"),   # a parent after its child
    ("tree_attention", _tree_attention_args, {"parents": torch.tensor([[-1, 0, 0, 1], [-1, -2, 1, 2]])},
     ValueError, "parents"),
    ("tree_attention", _tree_attention_args, {"cache_lens": torch.tensor([3, 18])},
     ValueError, "cache_lens"),
    ("tree_attention", _tree_attention_args, {"q": torch.randn(2, 8, 65, 16), **_kv(2, 2, 80, 16),
                                              "parents": torch.full((2, 65), -1)},
     ValueError, "n <= 64"),
    ("tree_attention", _tree_attention_args, {"q": torch.randn(2, 0, 4, 16)}, ValueError, "multiple"),
    ("tree_verify", _tree_verify_args, {"tokens": torch.zeros(2, 5, dtype=torch.int64)},
     ValueError, "tokens"),
    ("tree_verify", _tree_verify_args, {"greedy": torch.zeros(2, 4)}, TypeError, "greedy"),
    ("tree_verify", _tree_verify_args, {"parents": torch.tensor([[-1, 0, 0, 1], [-1, 0, 3, 2]])},
     ValueError, "parents"),
    ("tree_verify", _tree_verify_args, {"greedy": torch.zeros(2, 0, dtype=torch.int64),
                                        "tokens": torch.zeros(2, 0, dtype=torch.int64),
                                        "parents": torch.zeros(2, 0, dtype=torch.int64)},
     ValueError, "n <= 64"),
    ("lm_head_argmax", _lm_head_args, {"weight": torch.randn(20, 9)}, ValueError, "weight"),
    ("lm_head_argmax", _lm_head_args, {"weight": torch.randn(20, 8).double()},
     TypeError, "weight"),
    ("lm_head_argmax", _lm_head_args, {"hidden": torch.randn(6, 8)}, ValueError, "hidden"),
]
BAD_INPUT_IDS = [f"{case[0]}-{i}" for i, case in enumerate(BAD_INPUTS)]


@pytest.mark.parametrize("native", [True, False], ids=["native", "reference"])
@pytest.mark.parametrize("op, make_args, change, error, fragment", BAD_INPUTS, ids=BAD_INPUT_IDS)
def test_bad_inputs(op, make_args, change, error, fragment, native, monkeypatch):
    # Both paths must refuse; value checks run in C++ on one and in Python on the other.
    if native and not ops.native_available():
        pytest.skip("native extension not built")
    if fragment in ("D <= 256", "n <= 64") and not ops.native_available():
        pytest.skip("the kernels' limits are read from the extension")
    monkeypatch.setattr(ops, "_native_kernels_enabled", native)
    with pytest.raises(error, match=fragment):
        getattr(ops, op)(**make_args("cpu", **change))


@pytest.mark.skipif(not ops.native_available(), reason="native extension not built")
@pytest.mark.parametrize("op, make_args, change, error, fragment", BAD_INPUTS, ids=BAD_INPUT_IDS)
def test_cpp_checks_reject_what_python_rejects(op, make_args, change, error, fragment):
    # The C++ checks (csrc/checks.h) are the definition; called directly they must
    # refuse every input the Python wrapper refuses, with the same error type.
    kwargs = make_args("cpu", **change)
    table = kwargs.pop("page_table", None)
    args = list(kwargs.values())
    if not all(isinstance(x, torch.Tensor) for x in args):
        pytest.skip("not a tensor: the dispatcher refuses it before any check")
    if "attention" in op:  # the schema's scale, then the optional page_table
        args += [1.0] + ([table] if table is not None else [])
    with pytest.raises(error, match=fragment):
        getattr(torch.ops.cllm_rt, op)(*args)


@pytest.mark.skipif(not ops.native_available(), reason="native extension not built")
@pytest.mark.parametrize("op, make_args, change", [
    ("block_attention", _attention_args, {"cache_lens": torch.tensor([-1, 18])}),
    ("tree_attention", _tree_attention_args, {"cache_lens": torch.tensor([3, 18])}),
    ("tree_attention", _tree_attention_args, {"parents": torch.tensor([[-1, 0, 3, 1], [-1, -2, 1, 2]])}),
    ("tree_verify", _tree_verify_args, {"parents": torch.tensor([[-1, 0, 0, 1], [-1, 0, 3, 2]])}),
    ("block_attention", _paged_attention_args, {"page_table": torch.tensor([[0, 1], [2, 7]])}),
], ids=["block-lens", "tree-lens", "tree-parents", "verify-parents", "page-table"])
def test_value_errors_are_the_same_on_both_paths(op, make_args, change, monkeypatch):
    messages = []
    for native in (True, False):
        monkeypatch.setattr(ops, "_native_kernels_enabled", native)
        with pytest.raises(ValueError) as error:
            getattr(ops, op)(**make_args("cpu", **change))
        messages.append(str(error.value))
    assert messages[0] == messages[1]


def test_wrong_device_raises():
    args = _jacobi_args("cpu", block=torch.zeros(2, 4, dtype=torch.int64, device="meta"))
    with pytest.raises(ValueError, match="block must be on logits's device"):
        ops.jacobi_verify(**args)


# ---------------------------------------------------------------- registration

def test_opcheck(device):
    logits = torch.randn(2, 3, 50, device=device)
    block = torch.randint(0, 50, (2, 3), device=device)
    q, k, v, lens = _attention_inputs(2, 4, 2, 3, 16, [4, 9], True, torch.float32, device)
    parents = torch.tensor([[-1, 0, 0], [-1, 0, 1]], device=device)
    hidden, weight = torch.randn(2, 3, 8, device=device), torch.randn(30, 8, device=device)
    torch.library.opcheck(torch.ops.cllm_rt.jacobi_verify.default, (logits, block))
    torch.library.opcheck(torch.ops.cllm_rt.block_attention.default, (q, k, v, lens, 0.25))
    torch.library.opcheck(torch.ops.cllm_rt.tree_attention.default, (q, k, v, lens, parents, 0.25))
    torch.library.opcheck(torch.ops.cllm_rt.tree_verify.default, (block, block, parents))
    torch.library.opcheck(torch.ops.cllm_rt.lm_head_argmax.default, (hidden, weight))


# ---------------------------------------------------------------- linear

LINEAR_SHAPES = [((1, 5), (3,)), ((2, 40), (25, 8)), ((2, 7, 33), (9, 1)), ((13, 64), (17, 48)), ((3, 21, 100), (5,))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("in_shape, outs", LINEAR_SHAPES)
def test_linear_matches_reference_and_is_row_invariant(device, dtype, in_shape, outs):
    g = torch.Generator().manual_seed(len(in_shape) * 100 + in_shape[-1])
    K = in_shape[-1]
    x = torch.randn(in_shape, generator=g).to(dtype).to(device)
    weights = [torch.randn(N, K, generator=g).to(dtype).to(device) for N in outs]
    biases = [torch.randn(N, generator=g).to(dtype).to(device) if i % 2 == 0 else None
              for i, N in enumerate(outs)]
    got = ops.linear(x, weights, biases)
    want = ops.linear_reference(x, weights, biases)
    tol = {torch.float64: 1e-12, torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == dtype
        torch.testing.assert_close(a.double(), b.double(), atol=tol, rtol=tol)
    # One row at a time gives the same bits as all rows at once: the kernel's sums ignore the row count.
    rows = x.reshape(-1, K)
    one_by_one = [torch.cat(col) for col in zip(*(ops.linear(rows[i:i + 1], weights, biases)
                                                    for i in range(rows.shape[0])))]
    for a, b in zip(got, one_by_one):
        assert torch.equal(a.reshape(-1, a.shape[-1]), b)


@pytest.mark.skipif(not ops.native_available(), reason="native extension not built")
def test_linear_opcheck():
    x = torch.randn(3, 5, 20, dtype=torch.float64)
    ws = [torch.randn(7, 20, dtype=torch.float64), torch.randn(4, 20, dtype=torch.float64)]
    torch.library.opcheck(torch.ops.cllm_rt.linear.default, (x, ws, [torch.randn(7, dtype=torch.float64), None]))


def test_linear_rejects_bad_input():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"input must be a float tensor \[\.\.\., K\] with K >= 1"):
        ops.linear(torch.randn(2, 0), [torch.randn(3, 0)])  # no products: nothing would write the outputs
    if ops.native_available():
        with pytest.raises(ValueError, match="linear: input must be \\[\\.\\.\\., K\\] with K >= 1"):
            torch.ops.cllm_rt.linear(torch.randn(2, 0), [torch.randn(3, 0)], [None])
    with pytest.raises(ValueError, match=r"weights\[0\] must have shape"):
        ops.linear(x, [torch.randn(3, 9)])
    with pytest.raises(TypeError, match=r"weights\[0\] must have dtype"):
        ops.linear(x, [torch.randn(3, 8, dtype=torch.float64)])
    with pytest.raises(ValueError, match="one bias entry"):
        ops.linear(x, [torch.randn(3, 8)], [None, None])
    with pytest.raises(ValueError, match=r"biases\[0\] must have shape"):
        ops.linear(x, [torch.randn(3, 8)], [torch.randn(4)])


# ---------------------------------------------------------------- linear_int8

def _int8_operands(in_shape, outs, dtype, device, seed):
    """x, int8 weights over the whole range, positive scales of a few magnitudes, biases on every other weight."""
    g = torch.Generator().manual_seed(seed)
    K = in_shape[-1]
    x = torch.randn(in_shape, generator=g).to(dtype).to(device)
    weights = [torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8).to(device) for N in outs]
    scales = [(torch.rand(N, generator=g) * 0.02 + 1e-3).to(dtype).to(device) for N in outs]
    biases = [torch.randn(N, generator=g).to(dtype).to(device) if i % 2 == 0 else None for i, N in enumerate(outs)]
    return x, weights, scales, biases


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("in_shape, outs", LINEAR_SHAPES + [((37, 576), (50, 3))])
def test_linear_int8_matches_the_dequantized_product_and_is_row_invariant(device, dtype, in_shape, outs):
    x, weights, scales, biases = _int8_operands(in_shape, outs, dtype, device, len(in_shape) * 100 + in_shape[-1])
    got = ops.linear_int8(x, weights, scales, biases)
    want = ops.linear_int8_reference(x, weights, scales, biases)  # float64 products of the int8 values
    tol = {torch.float64: 1e-12, torch.float32: 1e-4}[dtype]
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == dtype
        torch.testing.assert_close(a.double(), b.double(), atol=tol, rtol=tol)
    # Exact for the quantized model: a row's bits are the same whatever the rows beside it (1, 2, all), so a
    # token tree's forward gives the tokens of one-token steps through the same kernel.
    rows = x.reshape(-1, x.shape[-1])
    for width in (1, 2):
        parts = [ops.linear_int8(rows[i:i + width], weights, scales, biases) for i in range(0, rows.shape[0], width)]
        for a, col in zip(got, zip(*parts)):
            assert torch.equal(a.reshape(-1, a.shape[-1]), torch.cat(col))


@pytest.mark.skipif(not ops.native_available(), reason="native extension not built")
def test_linear_int8_opcheck():
    x, weights, scales, biases = _int8_operands((3, 5, 20), (7, 4), torch.float64, "cpu", 0)
    torch.library.opcheck(torch.ops.cllm_rt.linear_int8.default, (x, weights, scales, biases))


def test_linear_int8_rejects_bad_input():
    x, w, s = torch.randn(2, 8), torch.zeros(3, 8, dtype=torch.int8), torch.ones(3)
    with pytest.raises(ValueError, match="input must be .* with K >= 1"):
        ops.linear_int8(torch.randn(2, 0), [torch.zeros(3, 0, dtype=torch.int8)], [s])
    with pytest.raises(TypeError, match="input must be a float32 or float64 tensor"):
        ops.linear_int8(x.bfloat16(), [w], [s.bfloat16()])
    with pytest.raises(TypeError, match=r"weights\[0\] must have dtype in \(int8\)"):
        ops.linear_int8(x, [w.float()], [s])
    with pytest.raises(ValueError, match=r"weights\[0\] must have shape"):
        ops.linear_int8(x, [torch.zeros(3, 9, dtype=torch.int8)], [s])
    with pytest.raises(TypeError, match=r"scales\[0\] must have dtype in \(float32\)"):
        ops.linear_int8(x, [w], [s.double()])
    with pytest.raises(ValueError, match=r"scales\[0\] must have shape \[N=3\]"):
        ops.linear_int8(x, [w], [torch.ones(4)])
    with pytest.raises(ValueError, match=r"biases\[0\] must have shape"):
        ops.linear_int8(x, [w], [s], [torch.randn(4)])
    with pytest.raises(ValueError, match="one scale and one bias entry"):
        ops.linear_int8(x, [w], [s, s])


@pytest.mark.skipif(not ops.native_available(), reason="native extension not built")
def test_linear_int8_kernel_checks_match_the_python_ones():
    x, w, s = torch.randn(2, 8), torch.zeros(3, 8, dtype=torch.int8), torch.ones(3)
    with pytest.raises(ValueError, match="linear_int8: input must be .* with K >= 1"):
        torch.ops.cllm_rt.linear_int8(torch.randn(2, 0), [torch.zeros(3, 0, dtype=torch.int8)], [s], [None])
    with pytest.raises(TypeError, match="linear_int8: input must be float32 or float64"):
        torch.ops.cllm_rt.linear_int8(x.half(), [w], [s.half()], [None])
    with pytest.raises(TypeError, match=r"linear_int8: weights\[0\] must be int8"):
        torch.ops.cllm_rt.linear_int8(x, [w.float()], [s], [None])
    with pytest.raises(ValueError, match=r"linear_int8: scales\[0\] must be \[N = 3\]"):
        torch.ops.cllm_rt.linear_int8(x, [w], [torch.ones(2)], [None])
