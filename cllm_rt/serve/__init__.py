"""An OpenAI-compatible HTTP server over the exact runtime, with continuous batching (``cllm-rt serve``).

FastAPI + uvicorn serve ``/v1/completions``, ``/v1/chat/completions`` (the tokenizer's chat template),
``/v1/models``, ``/health`` and ``/metrics`` (Prometheus text). One background thread owns the model and a
:class:`cllm_rt.runtime.decoding.Decoder`: requests that arrive while others decode join the running batch between
two steps (prefilled together in one forward), tokens go out as soon as a forward (or a prefill) made them
final, before the next forward runs, finished rows leave the batch, and a request whose client went away is
removed from it. Each request's tokens become text on that thread (:class:`TextStream`: whole characters only,
cut before a stop string) and travel to the event loop as deltas, streamed as server-sent events.

The texts equal ``cllm_rt.generate`` for the same prompt and settings: greedy (``model.generate(do_sample=False)``)
without a temperature, seeded sampling with one (``n`` choices are rows with seeds ``seed + i``; a request
without a seed is told the one it got). What cannot be honoured (penalties, logprobs, tools, ...) is answered 400
with the reason instead of being ignored in silence.

Limits, each answered at once and never by a dying server: a request body over ``max_body_bytes`` 413; a prompt
plus ``max_tokens`` beyond the model's positions 400; more than ``max_batch`` decoding plus ``max_queue``
waiting 503; a malformed body 400, all as OpenAI-style JSON errors. ``api_key`` (off by default; one key, or
several separated by commas, one per tenant) guards the ``/v1`` routes with ``Authorization: Bearer``. The draft
corpus is off by default, shared on request, or kept per key (``corpus="per-key"``).
"""

from .app import create_app
from .engine import Engine, Overloaded
from .launch import background, serve
from .text import TextStream

__all__ = ["Engine", "Overloaded", "TextStream", "background", "create_app", "serve"]
