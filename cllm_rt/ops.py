"""Kernels for Jacobi decoding: native ops from cllm_rt._C, pure-PyTorch references.

Each public op validates its inputs once (so the native and the reference paths
raise the same ValueError/TypeError naming the argument) and then runs the native
kernel when the extension is loaded and supports the tensors' device, else the
reference. ``*_reference`` functions are the specification the kernels are tested
against.
"""
from __future__ import annotations

import warnings

import torch

try:
    from cllm_rt import _C  # registers torch.ops.cllm_rt.*; needs torch imported first
except ImportError as error:
    _C = None
    warnings.warn(f"cllm_rt: native extension not loaded ({error}); using the PyTorch "
                  "reference ops", RuntimeWarning, stacklevel=2)

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
MAX_HEAD_DIM = 256


_native_enabled = True


def native_available() -> bool:
    """True when the compiled extension cllm_rt._C is loaded."""
    return _C is not None


def use_native(enabled: bool) -> None:
    """Route the ops to the compiled kernels (default) or to the PyTorch references, e.g. to compare them."""
    global _native_enabled
    _native_enabled = bool(enabled)


def _use_native(device: torch.device) -> bool:
    if not _native_enabled or _C is None:
        return False
    # A CPU-only build has no CUDA kernels: the reference takes CUDA tensors.
    return device.type == "cpu" or (device.type == "cuda" and bool(_C.WITH_CUDA))


# ---------------------------------------------------------------- validation

def _check_tensor(name, x, ndim, dtypes):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if x.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {x.dtype}")


def _check_same_device(name, x, ref_name, ref):
    if x.device != ref.device:
        raise ValueError(f"{name} must be on {ref_name}'s device {ref.device}, got {x.device}")


def _check_jacobi_verify(logits, block):
    _check_tensor("logits", logits, 3, _FLOAT_DTYPES)
    _check_tensor("block", block, 2, (torch.int64,))
    _check_same_device("block", block, "logits", logits)
    if tuple(block.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"block must have shape [B, n] = {tuple(logits.shape[:2])}, "
                         f"got {tuple(block.shape)}")
    if logits.shape[1] == 0 or logits.shape[2] == 0:
        raise ValueError(f"logits must have n >= 1 and V >= 1, got shape {tuple(logits.shape)}")


def _check_block_attention(q, k_cache, v_cache, cache_lens):
    _check_tensor("q", q, 4, _FLOAT_DTYPES)
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_tensor(name, x, 4, (q.dtype,))
        _check_same_device(name, x, "q", q)
        if not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    _check_tensor("cache_lens", cache_lens, 1, (torch.int32, torch.int64))
    _check_same_device("cache_lens", cache_lens, "q", q)
    B, Hq, n, D = q.shape
    Hkv, S_max = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape[0] != B or k_cache.shape[3] != D:
        raise ValueError(f"k_cache must have shape [B={B}, Hkv, S_max, D={D}], "
                         f"got {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, "
                         f"got {tuple(v_cache.shape)}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"q's head count {Hq} must be a multiple of k_cache's {Hkv}")
    if n == 0 or not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"q must have n >= 1 and 1 <= D <= {MAX_HEAD_DIM}, "
                         f"got shape {tuple(q.shape)}")
    if S_max < n:
        raise ValueError(f"k_cache's S_max = {S_max} must be at least the block length n = {n}")
    if cache_lens.shape[0] != B:
        raise ValueError(f"cache_lens must have shape [B={B}], got {tuple(cache_lens.shape)}")
    # Reading the lengths back from a GPU would stall every call; there the kernel
    # clamps instead, so bad lengths give wrong rows but never out-of-bounds reads.
    if cache_lens.device.type == "cpu" and B > 0:
        lo, hi = int(cache_lens.min()), int(cache_lens.max())
        if lo < 0 or hi + n > S_max:
            raise ValueError(f"cache_lens must satisfy 0 <= cache_lens[b] and cache_lens[b] + "
                             f"n <= S_max = {S_max} (n = {n}), got values in [{lo}, {hi}]")


def _check_lm_head_argmax(hidden, weight):
    _check_tensor("hidden", hidden, 3, _FLOAT_DTYPES)
    _check_tensor("weight", weight, 2, (hidden.dtype,))
    _check_same_device("weight", weight, "hidden", hidden)
    if weight.shape[1] != hidden.shape[2] or weight.shape[0] == 0:
        raise ValueError(f"weight must have shape [V >= 1, d={hidden.shape[2]}], "
                         f"got {tuple(weight.shape)}")


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- references

def accepted_length(block, greedy):
    """1 + the largest k with block[b, 1:1+k] == greedy[b, :k]: the block prefix proven greedy, [B] int64."""
    # block[b, k+1] was guessed for the token greedy[b, k] predicts; accept the prefix.
    matches = (block[:, 1:] == greedy[:, :-1]).long()  # [B, n-1]
    return 1 + matches.cumprod(-1).sum(-1)


def jacobi_verify_reference(logits, block):
    greedy = logits.argmax(-1)  # [B, n]
    return greedy, accepted_length(block, greedy)


def block_attention_reference(q, k_cache, v_cache, cache_lens, scale=None):
    B, Hq, n, D = q.shape
    Hkv, S_max = k_cache.shape[1], k_cache.shape[2]
    acc = _acc_dtype(q.dtype)
    scale = D ** -0.5 if scale is None else scale
    k = k_cache.to(acc).repeat_interleave(Hq // Hkv, dim=1)  # [B, Hq, S_max, D]
    v = v_cache.to(acc).repeat_interleave(Hq // Hkv, dim=1)
    scores = (q.to(acc) @ k.transpose(-1, -2)) * scale  # [B, Hq, n, S_max]
    last = cache_lens.view(B, 1, 1, 1) + torch.arange(n, device=q.device).view(1, 1, n, 1)
    hidden = torch.arange(S_max, device=q.device) > last  # [B, 1, n, S_max]
    probs = scores.masked_fill(hidden, float("-inf")).softmax(-1)
    return (probs @ v).to(q.dtype)


def lm_head_argmax_reference(hidden, weight):
    acc = _acc_dtype(hidden.dtype)
    return (hidden.to(acc) @ weight.to(acc).T).argmax(-1)


# ---------------------------------------------------------------- public ops

def jacobi_verify(logits: torch.Tensor, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens and accepted lengths of a Jacobi block.

    logits [B, n, V] float, block [B, n] int64 (the tokens fed in) ->
    greedy [B, n] int64 == logits.argmax(-1) exactly, accepted [B] int64 =
    1 + the largest k with block[b, 1:1+k] == greedy[b, :k].
    """
    _check_jacobi_verify(logits, block)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if _use_native(logits.device):
        return tuple(torch.ops.cllm_rt.jacobi_verify(logits, block))
    return jacobi_verify_reference(logits, block)


def block_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    cache_lens: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Attention of a block of n queries against a ragged KV cache.

    q [B, Hq, n, D] (any strides), k_cache/v_cache [B, Hkv, S_max, D] contiguous with
    the block's own keys already at cache_lens[b] .. cache_lens[b]+n-1, cache_lens [B]
    int32/int64. Query i of row b attends to positions 0 .. cache_lens[b]+i; q head h
    uses KV head h // (Hq // Hkv). Returns [B, Hq, n, D] contiguous in q's dtype.
    """
    _check_block_attention(q, k_cache, v_cache, cache_lens)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if _use_native(q.device):
        return torch.ops.cllm_rt.block_attention(q, k_cache, v_cache, cache_lens, scale)
    return block_attention_reference(q, k_cache, v_cache, cache_lens, scale)


def lm_head_argmax(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """argmax(hidden @ weight.T, -1) -> [B, n] int64, without the [B, n, V] logits.

    hidden [B, n, d], weight [V, d] of one dtype; products accumulate in float32
    (float64 for float64), so near-ties may differ from a product rounded to bf16.
    """
    _check_lm_head_argmax(hidden, weight)
    if _use_native(hidden.device):
        return torch.ops.cllm_rt.lm_head_argmax(hidden.contiguous(), weight.contiguous())
    return lm_head_argmax_reference(hidden, weight)


if _C is not None:
    @torch.library.register_fake("cllm_rt::jacobi_verify")
    def _(logits, block):
        B, n, _ = logits.shape
        return block.new_empty((B, n)), block.new_empty((B,))

    @torch.library.register_fake("cllm_rt::block_attention")
    def _(q, k_cache, v_cache, cache_lens, scale):
        return q.new_empty(q.shape)

    @torch.library.register_fake("cllm_rt::lm_head_argmax")
    def _(hidden, weight):
        return hidden.new_empty(hidden.shape[:2], dtype=torch.int64)
