"""Seeded sampling that every decoding path verifies exactly (:func:`cllm_rt.ops.gumbel_argmax`).

A sampled token is ``argmax(logits / T + g)`` over the tokens top-k/top-p/min-p keep, with Gumbel noise ``g``
a pure function of (row seed, position, token id). It is then a deterministic function of the prefix, like a
greedy token, so AR, Jacobi and token trees verify it with the greedy accept rule and give, for a seed, the
tokens of one-token-at-a-time sampling with the same noise, whatever the batch, block or drafts.
``model.generate(do_sample=True)`` draws other random numbers (torch.multinomial): the same distribution,
another sequence.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

from .. import ops

# transformers' defaults for fields a generation config leaves unset (GenerationConfig._get_default_generation_params)
_HF_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": 0.0}


@dataclass(frozen=True)
class SamplingParams:
    """One row's sampling: ``temperature`` 0 is greedy; ``top_k`` 0, ``top_p`` 1 and ``min_p`` 0 are off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0

    def __post_init__(self):
        checks = (("temperature", self.temperature, (int, float), lambda v: v >= 0, ">= 0"),
                  ("top_k", self.top_k, (int,), lambda v: v >= 0, "an integer >= 0"),
                  ("top_p", self.top_p, (int, float), lambda v: 0 < v <= 1, "in (0, 1]"),
                  ("min_p", self.min_p, (int, float), lambda v: 0 <= v <= 1, "in [0, 1]"),
                  ("seed", self.seed, (int,), lambda v: True, "an integer"))
        for name, value, types, ok, expected in checks:
            if isinstance(value, bool) or not isinstance(value, types) or not ok(value) or value != value:
                raise ValueError(f"{name} must be {expected}, got {value!r}")


def random_seed() -> int:
    """A fresh seed for a request that gave none; reported back so that its answer can be reproduced."""
    return secrets.randbits(63)


def sampling_from_config(config, do_sample=None, **given) -> SamplingParams | None:
    """The sampling ``model.generate`` would do with ``config`` and the arguments ``given`` (temperature, top_k,
    top_p, min_p, seed; None: not given), or None for greedy decoding. A sampling request without a seed gets
    :func:`random_seed`."""
    if do_sample is None:
        do_sample = bool(getattr(config, "do_sample", False))
    if not do_sample:
        return None
    values = {}
    for name, default in _HF_DEFAULTS.items():
        value = given.get(name)
        value = getattr(config, name, None) if value is None else value
        values[name] = default if value is None else value
    seed = given.get("seed")
    return SamplingParams(**values, seed=random_seed() if seed is None else seed)


def batch_sampling(params: list[SamplingParams | None], device) -> ops.Sampling | None:
    """The rows' parameters as tensors for the ops (a row without sampling decodes greedily), or None when
    no row samples, so that a greedy batch runs today's greedy path unchanged."""
    if all(p is None or p.temperature == 0 for p in params):
        return None
    rows = [p or SamplingParams(temperature=0.0) for p in params]

    def column(name, dtype):
        return torch.tensor([getattr(p, name) for p in rows], dtype=dtype, device=device)

    seeds = torch.tensor([ops.seed_as_int64(p.seed) for p in rows], dtype=torch.int64, device=device)
    return ops.Sampling(seeds, column("temperature", torch.float64), column("top_k", torch.int64),
                        column("top_p", torch.float64), column("min_p", torch.float64))
