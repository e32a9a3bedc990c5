"""What the runtime accepts: supported models, generation-config semantics as in ``model.generate``, and
prompt checks, each failing with one clear line instead of decoding wrongly."""

from __future__ import annotations

import copy
import warnings

import torch

from ..quantize import Int8Linear

# Architectures whose attention goes through transformers' AttentionInterface with standard causal
# semantics (no logit soft-capping, no learned absolute positions), checked against model.generate in tests.
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma"})

# Generation-config fields that would make model.generate's greedy output differ from a plain argmax.
_LOGITS_PROCESSOR_FIELDS = {
    "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "sequence_bias": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "min_new_tokens": None, "encoder_repetition_penalty": 1.0,
}


def check_model(model: torch.nn.Module) -> None:
    """Raise a clear error for a model this runtime cannot decode exactly."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(
            f"cllm_rt cannot decode model_type={model_type!r} exactly; supported: {sorted(SUPPORTED_MODEL_TYPES)}")
    rope = _position_dependent_rope(config)
    if rope is not None:
        raise NotImplementedError(
            f"cllm_rt cannot decode rope_type={rope!r} exactly: its frequencies depend on the largest position in "
            "a forward, which draft nodes (and other rows of a batch) reach before the committed tokens do")
    head = model.get_output_embeddings()
    if not isinstance(head, (torch.nn.Linear, Int8Linear)):
        raise NotImplementedError(f"the model's output head must be a plain nn.Linear or an Int8Linear "
                                  f"(cllm_rt.quantize), got {type(head).__name__}")


# RoPE variants that recompute their frequencies from max(position_ids) + 1 of each forward (transformers'
# dynamic_rope_update): longrope switches to its long factors past original_max_position_embeddings, dynamic
# NTK rescales past max_position_embeddings. A tree step runs draft nodes beyond the committed length (a
# plain Jacobi block even beyond a row's own budget), so the keys of tokens committed in that forward would
# get other frequencies than model.generate gives them.
_POSITION_DEPENDENT_ROPE = ("longrope", "dynamic")


def _position_dependent_rope(config) -> str | None:
    """The config's RoPE type if its frequencies depend on the positions of a forward, else None."""
    parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    # one dict, or one per layer type (e.g. {"full_attention": {...}, "sliding_attention": {...}})
    groups = [parameters] if "rope_type" in parameters or "type" in parameters else [
        p for p in parameters.values() if isinstance(p, dict)]
    for group in groups:
        rope = group.get("rope_type", group.get("type"))
        if rope in _POSITION_DEPENDENT_ROPE:
            return rope
    return None


class _NotGiven:
    """Default of ``eos_token_id``/``pad_token_id``: "not given" falls back on the generation config, while an
    explicit ``None`` disables it, exactly as in ``model.generate``."""

    def __repr__(self) -> str:
        return "NOT_GIVEN"


NOT_GIVEN = _NotGiven()

def greedy_generation_config(config):
    """A copy of ``config`` with every logits processor at its neutral value and sampling off: what
    ``--ignore-generation-config`` decodes (the plain argmax, stopping at the config's EOS)."""
    greedy = copy.deepcopy(config)
    for name, neutral in _LOGITS_PROCESSOR_FIELDS.items():
        setattr(greedy, name, neutral)
    greedy.do_sample, greedy.num_beams = False, 1
    return greedy


def resolve_special_tokens(model, eos_token_id=NOT_GIVEN, pad_token_id=NOT_GIVEN,
                           generation_config=None, sampling_decided: bool = False) -> tuple[list[int], int | None]:
    """EOS ids and pad id as ``model.generate`` resolves them: given values win (``None`` meaning "none"),
    absent ones come from ``generation_config`` (default: the model's). ``sampling_decided``: the caller has
    resolved do_sample itself (it can sample), so only beams are warned about."""
    config = model.generation_config if generation_config is None else generation_config
    for name, neutral in _LOGITS_PROCESSOR_FIELDS.items():
        value = getattr(config, name, neutral)
        if value not in (neutral, None, [], 0):
            raise NotImplementedError(f"generation_config.{name}={value!r} changes greedy decoding; cllm_rt "
                                      "decodes the plain argmax (pass generation_config="
                                      "greedy_generation_config(model.generation_config), or "
                                      "--ignore-generation-config on the command line)")
    if (getattr(config, "do_sample", False) and not sampling_decided) or getattr(config, "num_beams", 1) not in (None, 1):
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


def nan_error(rows: list[int]) -> FloatingPointError:
    return FloatingPointError(f"the model produced NaN for batch rows {rows}; greedy decoding is undefined "
                              "(check the weights and the dtype)")


def raise_on_nan(rows: list[int]) -> None:
    """Argmax over NaN logits is defined but meaningless: stop instead of emitting garbage."""
    if rows:
        raise nan_error(rows)
