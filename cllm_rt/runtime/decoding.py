"""Greedy Jacobi decoding over any supported Hugging Face decoder-only model.

Jacobi decoding (Santilli et al. 2023; CLLMs, Kou et al. 2024) feeds an n-token block
``[last final token, guess_1 … guess_{n-1}]`` through one forward and replaces every guess by the model's
greedy prediction. The first ``accepted`` tokens of the block are then proven equal to greedy
autoregressive decoding (``cllm_rt.ops.jacobi_verify``), their keys/values are committed to the cache, and
the block slides forward: the remaining predictions become the next guesses, new tail positions are filled
by the guess policy below. Every forward makes at least one token final, so the output is *exactly* the
greedy AR output, in at most as many forwards.

Guess policy (seeded, documented): a position with no earlier prediction gets a token drawn uniformly from
its row's own prompt, as in the CLLM paper's reference code; ``seed`` makes runs reproducible.

The loop keeps prefill and decode apart (as gpt-fast does) and does one host sync per step: the accepted
counts and greedy tokens travel to the host together for streaming, EOS and budget bookkeeping.
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field

import torch

from .. import ops
from .attention import CACHE_LENGTHS_KWARG, jacobi_attention
from .cache import JacobiCache

# Architectures whose attention goes through transformers' AttentionInterface with standard causal
# semantics (no logit soft-capping, no learned absolute positions), checked against model.generate in tests.
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma"})

# Generation-config fields that would make model.generate's greedy output differ from a plain argmax.
_LOGITS_PROCESSOR_FIELDS = {
    "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "sequence_bias": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "min_new_tokens": None, "encoder_repetition_penalty": 1.0,
}


@dataclass
class GenerationStats:
    forward_passes: int = 0  # decode forwards, prefill excluded
    new_tokens: list[int] = field(default_factory=list)  # per input row
    accepted_histogram: list[int] = field(default_factory=list)  # [k] = row-steps that made k tokens final
    prefill_seconds: float = 0.0
    wall_seconds: float = 0.0

    @property
    def tokens_per_forward(self) -> float:
        """Mean tokens made final per row per decode forward (1.0 for autoregressive decoding)."""
        steps = sum(self.accepted_histogram)
        return sum(k * c for k, c in enumerate(self.accepted_histogram)) / steps if steps else 0.0


@dataclass
class GenerationOutput:
    sequences: torch.LongTensor  # [B, prompt + new]: the inputs as given, then new tokens (pad after a row ends)
    stats: GenerationStats


def check_model(model: torch.nn.Module) -> None:
    """Raise a clear error for a model this runtime cannot decode exactly."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(
            f"cllm_rt cannot decode model_type={model_type!r} exactly; supported: {sorted(SUPPORTED_MODEL_TYPES)}")
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise NotImplementedError(f"the model's output head must be a plain nn.Linear, got {type(head).__name__}")


class _NotGiven:
    """Default of ``eos_token_id``/``pad_token_id``: "not given" falls back on the generation config, while an
    explicit ``None`` disables it, exactly as in ``model.generate``."""

    def __repr__(self) -> str:
        return "NOT_GIVEN"


NOT_GIVEN = _NotGiven()

# Sampling settings that model.generate would honour; cllm_rt always decodes greedily.
_SAMPLING_FIELDS = ("do_sample", "num_beams")


def greedy_generation_config(config):
    """A copy of ``config`` with every logits processor at its neutral value and sampling off: what
    ``--ignore-generation-config`` decodes (the plain argmax, stopping at the config's EOS)."""
    greedy = copy.deepcopy(config)
    for name, neutral in _LOGITS_PROCESSOR_FIELDS.items():
        setattr(greedy, name, neutral)
    greedy.do_sample, greedy.num_beams = False, 1
    return greedy


def resolve_special_tokens(model, eos_token_id=NOT_GIVEN, pad_token_id=NOT_GIVEN,
                           generation_config=None) -> tuple[list[int], int | None]:
    """EOS ids and pad id as ``model.generate`` resolves them: given values win (``None`` meaning "none"),
    absent ones come from ``generation_config`` (default: the model's)."""
    config = model.generation_config if generation_config is None else generation_config
    for name, neutral in _LOGITS_PROCESSOR_FIELDS.items():
        value = getattr(config, name, neutral)
        if value not in (neutral, None, [], 0):
            raise NotImplementedError(f"generation_config.{name}={value!r} changes greedy decoding; cllm_rt "
                                      "decodes the plain argmax (pass generation_config="
                                      "greedy_generation_config(model.generation_config), or "
                                      "--ignore-generation-config on the command line)")
    if getattr(config, "do_sample", False) or getattr(config, "num_beams", 1) not in (None, 1):
        warnings.warn(f"the generation config asks for do_sample={config.do_sample}, num_beams={config.num_beams}; "
                      "cllm_rt decodes greedily, as model.generate(do_sample=False, num_beams=1) would",
                      UserWarning, stacklevel=3)
    if eos_token_id is NOT_GIVEN:
        eos_token_id = config.eos_token_id
    eos = [] if eos_token_id is None else [int(t) for t in (
        eos_token_id.tolist() if isinstance(eos_token_id, torch.Tensor) else
        eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id])]
    if pad_token_id is NOT_GIVEN:
        pad_token_id = config.pad_token_id
    if pad_token_id is None and eos:
        pad_token_id = eos[0]  # what generate does, with a warning
    return eos, pad_token_id


def unpad_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    """Left-padded ``[B, L]`` prompts → ``[B, L]`` tokens with each row's real tokens first, and lengths ``[B]``.

    The cache stores each row from position 0 with no padding, so rows differ only in their lengths.
    """
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.LongTensor [batch, length], got {type(input_ids).__name__} "
                        "(e.g. torch.tensor([[1, 2, 3]]))")
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be a [batch, length] tensor, got shape {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
    batch, length = input_ids.shape
    if batch == 0 or length == 0:
        raise ValueError(f"empty prompt: input_ids has shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        return input_ids.long(), torch.full((batch,), length, dtype=torch.int64, device=input_ids.device)
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a tensor like input_ids, got {type(attention_mask).__name__}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
    mask = attention_mask.to(torch.bool)
    lengths = mask.sum(1)
    if bool((lengths == 0).any()):
        raise ValueError(f"empty prompt: rows {(lengths == 0).nonzero().flatten().tolist()} have no attended token")
    positions = torch.arange(length, device=input_ids.device)
    if not bool((mask == (positions >= length - lengths[:, None])).all()):
        raise ValueError("attention_mask must be left padding (zeros then ones in every row), "
                         "as for model.generate with a decoder-only model")
    # roll each row left by its padding so real tokens start at position 0
    source = (positions[None, :] + (length - lengths)[:, None]) % length
    return input_ids.long().gather(1, source), lengths.long()


def check_token_ids(model, input_ids: torch.Tensor) -> None:
    """Refuse ids the embedding has no row for (torch would raise an IndexError from deep inside the model)."""
    vocab = model.get_input_embeddings().num_embeddings
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab:
        raise ValueError(f"input_ids must be token ids in [0, {vocab}) for this model, got values in [{low}, {high}]")


def prefill(model, cache: JacobiCache, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Write the prompts into the cache and return each row's first greedy token ``[B]``.

    ``tokens`` [B, L] holds each prompt from column 0 with junk after ``lengths[b]``: causal attention keeps
    the junk out of every real position, and the cache rows are cut back to ``lengths`` afterwards.
    """
    hidden = forward_block(model, cache, tokens)  # [B, L, d]
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    last = hidden[rows, lengths - 1, None]  # [B, 1, d]
    raise_on_nan(last.isnan().flatten(1).any(1).nonzero().flatten().tolist())
    cache.commit(lengths, lengths.tolist())
    greedy, _ = verify_block(model, last, tokens[rows, lengths - 1, None])  # a 1-token "block": the last prompt token
    return greedy[:, 0]


def forward_block(model, cache: JacobiCache, block: torch.Tensor) -> torch.Tensor:
    """One forward of ``block`` [B, n] placed after each row's cached tokens; returns hidden states [B, n, d]."""
    cache.begin_block(block.shape[1])
    positions = cache.lengths[:, None] + torch.arange(block.shape[1], device=block.device)
    out = model.base_model(input_ids=block, position_ids=positions, cache=cache, use_cache=True,
                           **{CACHE_LENGTHS_KWARG: cache.lengths})
    return out.last_hidden_state


def jacobi_step(model, cache: JacobiCache, block: torch.Tensor):
    """Forward ``block``; return ``(greedy [B, n], accepted [B], nan [B])``, leaving the cache uncommitted.

    ``nan[b]`` flags NaN hidden states in row b: argmax over NaN logits is well defined but meaningless, so
    the caller raises instead of emitting garbage (checked on the hidden states, d values per token, not V).
    """
    hidden = forward_block(model, cache, block)  # [B, n, d]
    greedy, accepted = verify_block(model, hidden, block)
    return greedy, accepted, hidden.isnan().flatten(1).any(1)


# The fused LM-head argmax pays off from about 8 rows (B*n) on: on the 2-core development CPU
# (benchmarks/bench_head.py, vocab 32k and 128k, d=1024) it was 1.4-4.8x faster than linear + jacobi_verify
# at 8-128 rows and 0.23-0.9x at one row, where torch's GEMV streams the weight faster. It is not yet
# measured on GPUs, so CUDA keeps cuBLAS + jacobi_verify.
FUSED_HEAD_MIN_ROWS = 8


def verify_block(model, hidden: torch.Tensor, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens ``[B, n]`` of the LM head over ``hidden`` [B, n, d] and accepted lengths ``[B]`` of ``block``."""
    head = model.get_output_embeddings()
    if head.bias is None and hidden.device.type == "cpu" and block.numel() >= FUSED_HEAD_MIN_ROWS:
        greedy = ops.lm_head_argmax(hidden, head.weight)  # no [B, n, V] logits are materialized
        return greedy, ops.accepted_length(block, greedy)
    return ops.jacobi_verify(head(hidden), block)


def next_block(greedy: torch.Tensor, accepted: torch.Tensor, guesses: torch.Tensor | None) -> torch.Tensor:
    """Slide the block: ``[greedy[a-1], greedy[a], …]`` then ``guesses`` where no prediction exists yet."""
    n = greedy.shape[1]
    if n == 1:  # autoregressive: the block is just the new token
        return greedy
    source = (accepted - 1)[:, None] + torch.arange(n, device=greedy.device)  # [B, n]
    shifted = greedy.gather(1, source.clamp(max=n - 1))
    return torch.where(source < n, shifted, guesses)


class PromptGuesses:
    """Seeded guess tokens drawn uniformly from each row's own prompt."""

    def __init__(self, tokens: torch.Tensor, lengths: torch.Tensor, seed: int):
        self.tokens, self.lengths = tokens, lengths
        self.generator = torch.Generator(device=tokens.device).manual_seed(seed)

    def draw(self, width: int) -> torch.Tensor:
        u = torch.rand(self.tokens.shape[0], width, generator=self.generator, device=self.tokens.device)
        return self.tokens.gather(1, (u * self.lengths[:, None]).long())

    def select_rows(self, rows: torch.Tensor) -> None:
        self.tokens, self.lengths = self.tokens.index_select(0, rows), self.lengths.index_select(0, rows)


def check_positions(model, longest_prompt: int, max_new_tokens: int) -> None:
    """Refuse sequences the model has no positions for, or that a sliding window would cut."""
    config = model.config
    total = longest_prompt + max_new_tokens
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and total > limit:
        raise ValueError(f"prompt ({longest_prompt}) + max_new_tokens ({max_new_tokens}) = {total} exceeds the "
                         f"model's max_position_embeddings ({limit})")
    window = getattr(config, "sliding_window", None)
    if window is not None and total > window:
        raise NotImplementedError(f"sequences of {total} tokens exceed the sliding window ({window}); "
                                  "block_attention implements full causal attention only")


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, max_new_tokens: int,
             block_size: int = 16, eos_token_id=NOT_GIVEN, pad_token_id=NOT_GIVEN, generation_config=None,
             streamer=None, seed: int = 0) -> GenerationOutput:
    """Greedy generation by Jacobi decoding; ``sequences`` equals ``model.generate(..., do_sample=False)``.

    ``block_size=1`` is plain autoregressive decoding in the same runtime. Batches are left-padded as for
    ``model.generate``; each row finishes on its own (EOS or ``max_new_tokens``) and leaves the batch.
    ``eos_token_id``/``pad_token_id`` not given fall back on ``generation_config`` (default: the model's);
    given as ``None`` they are off, as in ``model.generate``.
    """
    for name, value in (("block_size", block_size), ("max_new_tokens", max_new_tokens)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    check_model(model)
    eos, pad_token_id = resolve_special_tokens(model, eos_token_id, pad_token_id, generation_config)
    device = model.get_output_embeddings().weight.device
    tokens, lengths = unpad_prompts(input_ids, attention_mask)
    check_token_ids(model, input_ids)
    input_ids, tokens, lengths = input_ids.to(device), tokens.to(device), lengths.to(device)
    batch = tokens.shape[0]
    if streamer is not None and batch != 1:
        raise ValueError("streaming supports batch size 1 (as transformers' streamers do)")
    check_positions(model, tokens.shape[1], max_new_tokens)

    start = time.perf_counter()
    stats = GenerationStats(accepted_histogram=[0] * (block_size + 1))
    outputs: list[list[int]] = [[] for _ in range(batch)]
    eos_set = set(eos)
    cache = JacobiCache(model.config.num_hidden_layers, torch.zeros_like(lengths),
                        max_len=tokens.shape[1] + max_new_tokens + block_size)
    guesses = PromptGuesses(tokens, lengths, seed)
    rows = list(range(batch))  # active position → input row

    with jacobi_attention(model):
        if streamer is not None:
            streamer.put(input_ids.cpu())
        first = prefill(model, cache, tokens, lengths)
        stats.prefill_seconds = time.perf_counter() - start
        block = first[:, None]
        pending = [[t] for t in first.tolist()]  # final tokens not yet emitted, per active position
        while True:
            done = []
            for i, row in enumerate(rows):
                before = len(outputs[row])
                finished = _emit(outputs[row], pending[i], max_new_tokens, eos_set)
                if streamer is not None:
                    streamer.put(torch.tensor(outputs[row][before:]))
                if finished:
                    done.append(i)
            if done:
                keep = [i for i in range(len(rows)) if i not in done]
                if not keep:
                    break
                index = torch.tensor(keep, device=device)
                cache.select_rows(index, keep)
                guesses.select_rows(index)
                block = block.index_select(0, index)
                rows = [rows[i] for i in keep]
            width = min(block_size, max(max_new_tokens - len(outputs[row]) for row in rows))
            if block.shape[1] < width:
                block = torch.cat([block[:, :1], guesses.draw(width)[:, 1:]], 1)
            greedy, accepted, nan = jacobi_step(model, cache, block[:, :width])
            host = torch.cat([nan[:, None], accepted[:, None], greedy], 1).tolist()  # the step's one host sync
            raise_on_nan([rows[i] for i, h in enumerate(host) if h[0]])
            accepted_host = [h[1] for h in host]
            pending = [h[2:2 + a] for h, a in zip(host, accepted_host)]
            for a in accepted_host:
                stats.accepted_histogram[a] += 1
            stats.forward_passes += 1
            cache.commit(accepted, accepted_host)
            block = next_block(greedy, accepted, guesses.draw(width) if width > 1 else None)
    if streamer is not None:
        streamer.end()

    stats.new_tokens = [len(out) for out in outputs]
    stats.wall_seconds = time.perf_counter() - start
    return GenerationOutput(_assemble(input_ids, outputs, pad_token_id), stats)


def _emit(out: list[int], new: list[int], max_new_tokens: int, eos: set[int]) -> bool:
    """Append newly final tokens to a row, cut at EOS or the budget; True once the row is done."""
    for token in new[:max_new_tokens - len(out)]:
        out.append(token)
        if token in eos:
            return True
    return len(out) >= max_new_tokens


def _assemble(input_ids: torch.Tensor, outputs: list[list[int]], pad_token_id: int | None) -> torch.Tensor:
    """The prompts as given, then each row's new tokens padded to the longest row (as model.generate does)."""
    width = max(len(out) for out in outputs)
    if pad_token_id is None and any(len(out) < width for out in outputs):
        raise RuntimeError("rows ended at different lengths but no pad_token_id is set")
    new = torch.full((len(outputs), width), -1 if pad_token_id is None else pad_token_id, dtype=torch.long)
    for row, out in enumerate(outputs):
        new[row, :len(out)] = torch.tensor(out, dtype=torch.long)
    return torch.cat([input_ids.long(), new.to(input_ids.device)], 1)


def raise_on_nan(rows: list[int]) -> None:
    """Argmax over NaN logits is defined but meaningless: stop instead of emitting garbage."""
    if rows:
        raise FloatingPointError(f"the model produced NaN for batch rows {rows}; greedy decoding is undefined "
                                 "(check the weights and the dtype)")
