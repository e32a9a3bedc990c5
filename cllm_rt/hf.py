"""cllm_rt inside Hugging Face ``generate``: ``model.generate(..., custom_generate=cllm_rt.hf.generate)``.

transformers 5.24 (``GenerationMixin.generate`` in generation/utils.py) takes two forms of ``custom_generate``:

* a callable, here :func:`generate`: HF prepares everything as for its own loop (the generation config merged
  with the call's keyword arguments and validated, attention mask, position ids, an empty cache, logits
  processors, stopping criteria with ``max_length``, ``streamer.put(prompt)``), then calls
  ``generate(model, input_ids, logits_processor=..., stopping_criteria=..., generation_config=..., **model_kwargs)``
  instead of its greedy loop. Keyword arguments of the call that :func:`generate` names and HF's ``_sample``
  does not (``block_size``, ``drafts``, ``max_tree_nodes``, ``corpus``, ``seed``) are handed through.
* a directory holding ``custom_generate/generate.py``, here :data:`CUSTOM_GENERATE_DIR` (a local directory needs
  ``trust_remote_code=True``): HF runs that file's ``generate(model=..., **every argument of the call)`` *before*
  any preparation. It goes back into HF's ``generate`` with the callable (:func:`generate_from_directory`), so
  both forms decode alike.

Exactness: the tokens are the Decoder's, i.e. HF greedy's. The stopping criteria run after every token on the
row as HF's loop holds it at that point (its left-padded prompt, then its new tokens), so a stop string completed
inside a path of several tokens accepted in one forward cuts the row at the very token HF stops at. Once a row
has stopped, HF fills it with pad tokens if an EOS criterion is present and otherwise keeps appending its greedy
tokens until every row has stopped; both are reproduced.

Two things 5.24 does not hand to a callable: ``streamer`` (HF puts the prompt, then passes on only arguments
absent from ``_sample``'s signature; a ``TextIteratorStreamer`` consumer would then wait forever), which is
therefore read from the calling frame of HF's ``generate``; and ``tokenizer``, so ``stop_strings=`` raises inside
HF before a callable runs: give the callable ``stopping_criteria=StoppingCriteriaList([StopStringCriteria(
tokenizer, [...])])``, or use the directory form, which turns ``stop_strings`` + ``tokenizer`` into that criterion.
"""

from __future__ import annotations

import copy
import inspect
import pathlib
import sys
from dataclasses import replace

import torch
from transformers import GenerationMixin, StoppingCriteriaList
from transformers.generation import (EosTokenCriteria, GenerateDecoderOnlyOutput, MaxLengthCriteria,
                                     MinPLogitsWarper, StopStringCriteria, TemperatureLogitsWarper, TopKLogitsWarper,
                                     TopPLogitsWarper)
from transformers.generation.configuration_utils import GenerationMode

from .runtime.decoding import Decoder
from .runtime.inputs import check_model, unpad_prompts
from .runtime.sampling import sampling_from_config

__all__ = ["CUSTOM_GENERATE_DIR", "generate", "generate_from_directory"]

# The directory to pass as custom_generate=...: it holds custom_generate/generate.py.
CUSTOM_GENERATE_DIR = str(pathlib.Path(__file__).with_name("hf_generate"))

# Criteria whose verdict is a function of the tokens alone (exact types: a subclass may read the scores).
_TOKEN_CRITERIA = (MaxLengthCriteria, EosTokenCriteria, StopStringCriteria)
# What HF prepares for its own forward passes; the runtime makes its own (unpadded rows, a paged cache).
_PREPARED_INPUTS = {"attention_mask", "position_ids", "cache", "use_cache", "logits_to_keep"}
# The warpers HF adds for do_sample=True; the runtime applies the same from the generation config.
_SAMPLING_WARPERS = (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper)
_OUTPUTS_NOT_PROVIDED = ("output_scores", "output_logits", "output_attentions", "output_hidden_states")
_HF_GENERATE = inspect.unwrap(GenerationMixin.generate).__code__


def generate(model, input_ids: torch.Tensor, logits_processor=None, stopping_criteria=None, generation_config=None,
             *, block_size: int = 16, drafts="auto", max_tree_nodes: int = 64, corpus=None, seed: int | None = None,
             **model_kwargs):
    """The decoding loop of ``model.generate`` for ``custom_generate=cllm_rt.hf.generate``: HF greedy's output
    (a tensor, or ``GenerateDecoderOnlyOutput`` with ``return_dict_in_generate=True``), many tokens per forward.

    ``block_size``, ``drafts``, ``max_tree_nodes``, ``corpus``, ``seed``: as in :func:`cllm_rt.generate`. With
    ``do_sample=True`` the tokens are :func:`cllm_rt.generate`'s seeded samples (temperature, top_k, top_p, min_p
    from the generation config; row b uses ``seed + b``), not HF's multinomial draws: the same distribution,
    another sequence. Pass ``seed`` to reproduce an answer (without one, a random seed is drawn).
    """
    if generation_config is None or stopping_criteria is None:
        raise TypeError("cllm_rt.hf.generate is a decoding loop for transformers: call "
                        "model.generate(..., custom_generate=cllm_rt.hf.generate)")
    streamer = _hf_streamer(sys._getframe(1))
    check_model(model)
    _check_decoding_mode(generation_config, logits_processor)
    sampling = sampling_from_config(generation_config, seed=seed)
    attention_mask = _check_model_inputs(model_kwargs)
    tokens, lengths = unpad_prompts(input_ids, attention_mask)
    if streamer is not None and input_ids.shape[0] != 1:
        raise ValueError("streaming supports batch size 1 (as transformers' streamers do)")
    rows = _Rows(input_ids, stopping_criteria, generation_config)
    prompts = [row[:n].tolist() for row, n in zip(tokens, lengths.tolist())]

    with torch.inference_mode(), Decoder(model, block_size=block_size, drafts=drafts, max_tree_nodes=max_tree_nodes,
                                         corpus=corpus, eos=rows.eos if rows.pad_after_stop else (),
                                         seed=0 if sampling is None else sampling.seed) as decoder:
        decoder.add(prompts, [rows.budget] * len(prompts), list(range(len(prompts))),
                    [None if sampling is None else replace(sampling, seed=sampling.seed + b) for b in range(len(prompts))])
        while decoder.rows:
            for handle, new, _ in decoder.emit():
                streamed = rows.take(handle, new)
                if streamer is not None:
                    for token in streamed:
                        streamer.put(torch.tensor([token]))  # one token per put, as HF's loop puts them
            for handle in rows.done():
                decoder.remove(handle)
            decoder.decode()
    if streamer is not None:
        streamer.end()
    sequences = rows.sequences().to(input_ids.device)
    return GenerateDecoderOnlyOutput(sequences=sequences) if generation_config.return_dict_in_generate else sequences


def generate_from_directory(model, *, tokenizer=None, stop_strings=None, stopping_criteria=None, **arguments):
    """What ``CUSTOM_GENERATE_DIR/custom_generate/generate.py`` runs: HF's own preparation of ``arguments`` (every
    argument of the ``model.generate`` call), then :func:`generate`. ``stop_strings`` become a
    ``StopStringCriteria`` here, because HF does not hand the tokenizer on to a callable."""
    config = arguments.get("generation_config")
    stop_strings = stop_strings or (config if config is not None else model.generation_config).stop_strings
    if stop_strings:
        if tokenizer is None:
            raise ValueError("stop_strings need the model's tokenizer: pass tokenizer=... to generate")
        stopping_criteria = StoppingCriteriaList([*(stopping_criteria or ()), StopStringCriteria(tokenizer,
                                                                                                 stop_strings)])
        if config is not None:
            arguments["generation_config"] = config = copy.deepcopy(config)
            config.stop_strings = None
        else:
            arguments["stop_strings"] = None  # overrides the model's generation config, which HF merges first
    return GenerationMixin.generate(model, custom_generate=generate, stopping_criteria=stopping_criteria,
                                    **arguments)


class _Rows:
    """Each row's tokens as HF's loop holds them (its padded prompt, then its new tokens) and where it stopped."""

    def __init__(self, input_ids: torch.Tensor, stopping_criteria, generation_config):
        for criterion in stopping_criteria:
            if type(criterion) not in _TOKEN_CRITERIA:
                raise NotImplementedError(
                    f"cllm_rt.hf.generate honours stopping criteria that depend on the tokens alone "
                    f"({', '.join(c.__name__ for c in _TOKEN_CRITERIA)}), not {type(criterion).__name__}")
        self.criteria = stopping_criteria
        self.eos = {int(t) for c in stopping_criteria if isinstance(c, EosTokenCriteria)
                    for t in c.eos_token_id.flatten().tolist()}
        # HF's _sample: with an EOS criterion stopped rows get pad tokens, without one their greedy tokens
        self.pad_after_stop = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
        pad = generation_config._pad_token_tensor
        if self.pad_after_stop and pad is None:
            raise ValueError("an EOS stopping criterion needs a pad_token_id for the rows that stop first")
        self.prompt_length = input_ids.shape[1]
        self.budget = stopping_criteria.max_length - self.prompt_length  # HF checked it is >= 1
        self.tokens = torch.full((input_ids.shape[0], self.prompt_length + self.budget),
                                 0 if pad is None else int(pad), dtype=torch.long)
        self.tokens[:, :self.prompt_length] = input_ids.cpu()
        self.new = [0] * len(self.tokens)  # tokens written per row
        self.stopped = [None] * len(self.tokens)  # new tokens when the criteria stopped the row

    def take(self, row: int, new: list[int]) -> list[int]:
        """Write a row's newly final tokens up to where the criteria stop it; returns those before the stop."""
        before_stop = []
        for token in new:
            if self.stopped[row] is not None and self.pad_after_stop:
                break
            self.tokens[row, self.prompt_length + self.new[row]] = token
            self.new[row] += 1
            if self.stopped[row] is None:
                before_stop.append(token)
                end = self.prompt_length + self.new[row]
                if bool(self.criteria(self.tokens[row:row + 1, :end], None)[0]):
                    self.stopped[row] = self.new[row]
        return before_stop

    def done(self) -> list[int]:
        """Rows that may leave the batch: stopped ones (with pad after the stop), else once all have stopped,
        those as long as the longest."""
        if self.pad_after_stop:
            return [r for r, s in enumerate(self.stopped) if s is not None]
        if None in self.stopped:
            return []
        return [r for r, n in enumerate(self.new) if n >= max(self.stopped)]

    def sequences(self) -> torch.Tensor:
        return self.tokens[:, :self.prompt_length + max(self.stopped)]


def _hf_streamer(caller):
    """The ``streamer`` given to HF's ``generate`` when it called us (it puts the prompt, then drops it)."""
    return caller.f_locals.get("streamer") if caller.f_code is _HF_GENERATE else None


def _check_decoding_mode(config, logits_processor) -> None:
    mode = config.get_generation_mode()
    # prompt lookup is assisted greedy or sampling decoding: the tokens of either, which the runtime makes
    if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE, GenerationMode.ASSISTED_GENERATION):
        raise NotImplementedError(f"cllm_rt.hf.generate decodes greedily or samples; this call asks for "
                                  f"{mode.value} (do_sample={config.do_sample}, num_beams={config.num_beams})")
    others = [p for p in logits_processor or () if not (config.do_sample and type(p) in _SAMPLING_WARPERS)]
    if others:
        names = ", ".join(type(p).__name__ for p in others)
        raise NotImplementedError(f"cllm_rt.hf.generate decodes the plain argmax; these logits processors would "
                                  f"change it: {names}")
    wanted = [name for name in _OUTPUTS_NOT_PROVIDED if getattr(config, name, False)]
    if config.return_dict_in_generate and wanted:
        raise NotImplementedError(f"cllm_rt.hf.generate returns sequences only; it cannot provide {', '.join(wanted)}")


def _check_model_inputs(model_kwargs: dict):
    """The attention mask; refuses inputs the runtime would ignore (embeddings, a filled cache, extra tensors)."""
    extra = sorted(k for k, v in model_kwargs.items() if k not in _PREPARED_INPUTS and v is not None)
    if extra:
        raise NotImplementedError(f"cllm_rt.hf.generate decodes from input_ids alone; it cannot take {extra}")
    cache = model_kwargs.get("cache")
    if cache is not None and int(cache.get_seq_length()) > 0:
        raise NotImplementedError("cllm_rt.hf.generate starts from an empty cache; the given cache holds tokens")
    return model_kwargs.get("attention_mask")
