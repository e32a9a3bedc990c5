"""An OpenAI-compatible HTTP server over the exact runtime, with continuous batching (``cllm-rt serve``).

FastAPI + uvicorn serve ``/v1/completions``, ``/v1/chat/completions`` (the tokenizer's chat template),
``/v1/models``, ``/health`` and ``/metrics`` (Prometheus text). One background thread owns the model and a
:class:`cllm_rt.runtime.decoding.Decoder`: requests that arrive while others decode join the running batch between
two steps (prefilled together in one forward), tokens go out as soon as a forward (or a prefill) made them
final, before the next forward runs, finished rows leave the batch, and a request whose client went away is
removed from it. Each request's tokens become text on that thread (:class:`TextStream`: whole characters only,
cut before a stop string) and travel to the event loop as deltas, streamed as server-sent events.

Greedy only, as the runtime is exact greedy decoding: the texts equal ``cllm_rt.generate`` (and so
``model.generate(do_sample=False)``) for the same prompt. A request for sampling (``temperature > 0``, ``top_p <
1``, penalties, ``n > 1``, ...) is answered 400 with the reason instead of being decoded greedily in silence.

Limits, each answered at once and never by a dying server: a request body over ``max_body_bytes`` 413; a prompt
plus ``max_tokens`` beyond the model's positions 400; more than ``max_batch`` decoding plus ``max_queue``
waiting 503; a malformed body 400, all as OpenAI-style JSON errors. ``api_key`` (off by default) guards the
``/v1`` routes with ``Authorization: Bearer``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import itertools
import json
import logging
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

import torch
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .runtime.decoding import Decoder
from .runtime.drafts import Corpus
from .runtime.inputs import check_model, check_positions, resolve_special_tokens

__all__ = ["Engine", "Overloaded", "TextStream", "background", "create_app"]

log = logging.getLogger("cllm_rt.serve")

# Fields some clients send that this server cannot honour (sampling, penalties, logprobs, tools, JSON mode),
# with the values that ask for nothing.
_NEUTRAL = {"top_p": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
            "top_k": (-1, 0, 1), "min_p": 0.0, "best_of": 1, "logit_bias": {}, "logprobs": (False, 0),
            "top_logprobs": 0, "echo": False, "suffix": "", "response_format": {"type": "text"}, "tools": []}
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Overloaded(Exception):
    """Every row decodes and the queue is full."""


class TextStream:
    """A generation's token ids → the text that is final.

    Decodes incrementally over a window (the tokens since the previous emission, after the one before: as vLLM
    does, so tokenizers that drop a leading space decode each piece as they decode the whole), and emits only
    whole characters: a multi-byte character split over tokens waits for its last token. The text is cut before
    the first stop string; :meth:`take` holds back a tail that may still grow into one.
    """

    def __init__(self, tokenizer, stop: list[str] = ()):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.prefix = self.read = 0  # the window: ids[prefix:] decodes to ids[prefix:read]'s text + new text
        self.text, self.sent, self.stopped = "", 0, False

    def push(self, token: int) -> bool:
        """Add one token; True once a stop string has appeared (the text now ends before it)."""
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> None:
        """The generation ended: text left waiting for a character's last byte is final as it is."""
        self._advance(final=True)

    def take(self, final: bool = False) -> str:
        """The final text not handed out yet."""
        end = len(self.text) if final or self.stopped else len(self.text) - self._held()
        delta, self.sent = self.text[self.sent:end], max(self.sent, end)
        return delta

    def _advance(self, final: bool) -> bool:
        if self.stopped:
            return True
        head = self._decode(self.prefix, self.read)
        window = self._decode(self.prefix, len(self.ids))
        if len(window) > len(head) and (final or not window.endswith("\ufffd")):
            checked = len(self.text)
            self.text += window[len(head):]
            self.prefix, self.read = self.read, len(self.ids)
            start = max(0, checked - max(map(len, self.stop), default=1) + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text, self.stopped = self.text[:min(hits)], True
        return self.stopped

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self.ids[start:end], skip_special_tokens=True) if end > start else ""

    def _held(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        return max((k for s in self.stop for k in range(min(len(s) - 1, len(self.text)), 0, -1)
                    if self.text.endswith(s[:k])), default=0)


@dataclass
class _Generation:
    """One request in flight: what the decode thread needs, and the events it sends back to the event loop."""

    handle: int
    prompt: list[int]
    max_tokens: int
    text: TextStream
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrived: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    tokens: int = 0
    finish_reason: str | None = None

    def send(self, *event) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening any more
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def feed(self, new: list[int], finished: bool, eos: set[int]) -> bool:
        """Take newly final tokens (decode thread); True once the generation is done."""
        for token in new:
            self.tokens += 1
            if token in eos:  # not part of the text, as in OpenAI's API
                self.finish_reason = "stop"
                break
            if self.text.push(token):
                self.finish_reason = "stop"
                break
        else:
            if finished:
                self.finish_reason = "length"
        if self.finish_reason is not None:
            self.text.flush()
        delta = self.text.take(final=self.finish_reason is not None)
        if delta:
            self.send("text", delta)
        if self.finish_reason is not None:
            self.send("done", self.finish_reason)
        return self.finish_reason is not None


class _Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("cllm_rt_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("cllm_rt_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("cllm_rt_generation_tokens", "tokens generated for requests", registry=r)
        self.forwards = Counter("cllm_rt_decode_forwards", "decode forwards (prefill excluded)", registry=r)
        self.row_steps = Counter("cllm_rt_row_steps", "rows taking part in decode forwards", registry=r)
        self.accepted = Counter("cllm_rt_accepted_tokens", "tokens made final by decode forwards", registry=r)
        self.tokens_per_forward = Gauge("cllm_rt_tokens_per_forward", "mean tokens made final per row per decode "
                                        "forward since the start", registry=r)
        self.queue_depth = Gauge("cllm_rt_queue_depth", "requests waiting to join the batch", registry=r)
        self.running = Gauge("cllm_rt_running_requests", "requests decoding in the batch", registry=r)
        self.ttft = Histogram("cllm_rt_time_to_first_token_seconds", "arrival to first generated token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.per_token = Histogram("cllm_rt_time_per_output_token_seconds", "first to last token, per later "
                                   "token", buckets=_TOKEN_BUCKETS, registry=r)
        self.latency = Histogram("cllm_rt_request_latency_seconds", "arrival to last token",
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("cllm_rt_queue_time_seconds", "arrival to joining the batch",
                                    buckets=_LATENCY_BUCKETS, registry=r)

    def finished(self, generation: _Generation) -> None:
        now = time.perf_counter()
        self.latency.observe(now - generation.arrived)
        if generation.tokens > 1:
            self.per_token.observe((now - generation.first_token) / (generation.tokens - 1))


class Engine:
    """The decode thread and its queue: :meth:`submit` from the event loop, events come back on each
    generation's queue. At most ``max_batch`` rows decode together and ``max_queue`` requests wait."""

    def __init__(self, model, tokenizer, *, block_size: int = 16, drafts="auto", max_batch: int = 16,
                 max_queue: int = 64, metrics: _Metrics | None = None):
        check_model(model)
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.model, self.tokenizer = model, tokenizer
        # the server's own corpus of earlier answers (a draft source): kept across requests, shared with no one
        self.decoder_options = dict(block_size=block_size, drafts=drafts, corpus=Corpus())
        self.eos = set(resolve_special_tokens(model)[0])
        self.max_batch, self.max_queue = max_batch, max_queue
        self.metrics = metrics or _Metrics()
        self._lock = threading.Condition()
        self._waiting: collections.deque[_Generation] = collections.deque()
        self._cancelled: set[int] = set()
        self._active: dict[int, _Generation] = {}  # the decode thread's own
        self._in_flight = 0
        self._row_steps = self._accepted = 0  # over every Decoder this engine ran: tokens per forward
        self._handles = itertools.count()
        self._closing = False
        self._thread = threading.Thread(target=self._serve, name="cllm_rt-decode", daemon=True)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def running(self) -> int:
        return len(self._active)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop the decode thread; requests still in flight get an error event."""
        with self._lock:
            self._closing = True
            self._lock.notify()
        if self._thread.is_alive():
            self._thread.join()
        for generation in self._waiting:
            generation.send("error", "the server is shutting down")
        self._waiting.clear()

    def submit(self, prompt: list[int], max_tokens: int, stop: list[str]) -> _Generation:
        """Queue a generation (event loop thread); raises :class:`Overloaded` at once when full."""
        generation = _Generation(next(self._handles), prompt, max_tokens, TextStream(self.tokenizer, stop),
                                 asyncio.get_running_loop())
        with self._lock:
            if self._closing:
                raise Overloaded("the server is shutting down")
            if self._in_flight >= self.max_batch + self.max_queue:
                raise Overloaded(f"{self.max_batch} requests decoding and {self.max_queue} waiting; retry later")
            self._in_flight += 1
            self._waiting.append(generation)
            self.metrics.queue_depth.set(len(self._waiting))
            self._lock.notify()
        return generation

    def cancel(self, generation: _Generation) -> None:
        """The client went away: drop the request from the queue, or its row from the batch (no-op once done)."""
        with self._lock:
            if generation in self._waiting:
                self._waiting.remove(generation)
                self._in_flight -= 1
                self.metrics.queue_depth.set(len(self._waiting))
            elif generation.finish_reason is None:
                self._cancelled.add(generation.handle)

    def _serve(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._waiting or self._closing)
                if self._closing:
                    return
            try:
                # a Decoder per busy period: the model runs the runtime's attention only while it decodes
                with torch.inference_mode(), Decoder(self.model, eos=self.eos, **self.decoder_options) as decoder:
                    self._decode(decoder)
            except Exception as error:  # noqa: BLE001  a failed step fails its requests, never the server
                log.exception("decoding failed")
                with self._lock:
                    for generation in self._active.values():
                        generation.send("error", f"decoding failed: {error}")
                    self._in_flight -= len(self._active)
                    self._active.clear()
                    self.metrics.running.set(0)

    def _decode(self, decoder: Decoder) -> None:
        """Step the batch until no row is left, letting requests join and leave between steps."""
        seen_steps = seen_tokens = 0
        while True:
            joining = self._admit(decoder)
            if joining:
                decoder.add([g.prompt for g in joining], [g.max_tokens for g in joining], [g.handle for g in joining])
                self.metrics.prompt_tokens.inc(sum(len(g.prompt) for g in joining))
            if not self._active:
                return
            events = decoder.emit()  # before the next forward: a first token right after its prefill
            now = time.perf_counter()
            done = []
            for handle, new, finished in events:
                generation = self._active[handle]
                if new and generation.first_token is None:
                    generation.first_token = now
                    self.metrics.ttft.observe(now - generation.arrived)
                before = generation.tokens
                if generation.feed(new, finished, self.eos):
                    done.append(generation)
                    if not finished:  # a stop string: the runtime does not know it is done
                        decoder.remove(handle)
                self.metrics.generation_tokens.inc(generation.tokens - before)
            with self._lock:
                for generation in done:
                    del self._active[generation.handle]
                self._in_flight -= len(done)
                self.metrics.running.set(len(self._active))
            for generation in done:
                self.metrics.finished(generation)
            if not decoder.rows:
                continue  # every row just finished or stopped: no forward to run or count
            decoder.decode()
            histogram = decoder.stats.accepted_histogram
            steps, tokens = sum(histogram), sum(k * c for k, c in enumerate(histogram))
            self.metrics.forwards.inc()
            self.metrics.row_steps.inc(steps - seen_steps)
            self.metrics.accepted.inc(tokens - seen_tokens)
            self._row_steps += steps - seen_steps
            self._accepted += tokens - seen_tokens
            self.metrics.tokens_per_forward.set(self._accepted / self._row_steps)
            seen_steps, seen_tokens = steps, tokens

    def _admit(self, decoder: Decoder) -> list[_Generation]:
        """Apply cancellations; move waiting requests into the batch while rows are free."""
        with self._lock:
            if self._closing:
                for generation in self._active.values():
                    generation.send("error", "the server is shutting down")
                self._in_flight -= len(self._active)
                self._active.clear()
            for handle in self._cancelled:
                if self._active.pop(handle, None) is not None:
                    decoder.remove(handle)
                    self._in_flight -= 1
            self._cancelled.clear()
            joining = []
            while self._waiting and not self._closing and len(self._active) < self.max_batch:
                generation = self._waiting.popleft()
                self._active[generation.handle] = generation
                joining.append(generation)
            self.metrics.queue_depth.set(len(self._waiting))
            self.metrics.running.set(len(self._active))
        now = time.perf_counter()
        for generation in joining:
            self.metrics.queue_time.observe(now - generation.arrived)
        return joining


# ---------------------------------------------------------------- HTTP


class _Request(BaseModel):
    # clients send fields this server does not use (user, seed, ...): accepted; those it cannot honour are
    # refused by _check_greedy
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    temperature: float | None = Field(None, ge=0)
    n: int = 1


class _CompletionRequest(_Request):
    prompt: str | list[int]


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict] | None = None


class _ChatRequest(_Request):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class _ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status)


def _check_greedy(body: _Request) -> None:
    if body.temperature is not None and body.temperature > 0:
        raise _ApiError(400, f"temperature={body.temperature} asks for sampling; this server decodes greedily "
                        "(send temperature 0 or leave it out)", param="temperature")
    if body.n != 1:
        raise _ApiError(400, f"n={body.n}: greedy decoding has one answer per prompt", param="n")
    extra = body.model_extra or {}
    for name, neutral in _NEUTRAL.items():
        value = extra.get(name)
        if value is not None and value not in (neutral if isinstance(neutral, tuple) else (neutral,)):
            raise _ApiError(400, f"{name}={value!r} is not supported: this server decodes the plain greedy argmax",
                            param=name)


def _stops(body: _Request) -> list[str]:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4:
        raise _ApiError(400, f"at most 4 stop sequences, got {len(stop)}", param="stop")
    return stop


def _message_text(message: _Message) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    if any(part.get("type") != "text" for part in message.content):
        raise _ApiError(400, "only text content parts are supported", param="messages")
    return "".join(str(part.get("text", "")) for part in message.content)


def create_app(model, tokenizer, *, model_name: str, api_key: str | None = None, block_size: int = 16,
               drafts="auto", max_batch: int = 16, max_queue: int = 64, max_body_bytes: int = 1 << 20) -> FastAPI:
    """The FastAPI app serving ``model`` under ``model_name``; its lifespan starts and stops the decode thread
    (``app.state.engine``)."""
    metrics = _Metrics()
    engine = Engine(model, tokenizer, block_size=block_size, drafts=drafts, max_batch=max_batch,
                    max_queue=max_queue, metrics=metrics)
    context = getattr(model.config, "max_position_embeddings", None)
    vocab = model.get_input_embeddings().num_embeddings

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.close)

    app = FastAPI(title="cllm_rt", lifespan=lifespan, max_body_size=max_body_bytes)
    app.state.engine = engine
    app.add_middleware(_CountRequests, counter=metrics.requests)
    started = int(time.time())

    @app.exception_handler(_ApiError)
    async def api_error(_request, error: _ApiError):
        return _error(error.status, error.message, error.kind, error.param)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, error: RequestValidationError):
        first = error.errors()[0]
        if first["type"] == "json_invalid":
            return _error(400, f"the request body is not valid JSON: {first['ctx']['error']} at character "
                          f"{first['loc'][-1]}")
        where = ".".join(str(part) for part in first["loc"][1:]) or "body"
        return _error(400, f"{where}: {first['msg']}", param=where)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, error: StarletteHTTPException):
        return _error(error.status_code, str(error.detail))

    @app.exception_handler(Exception)
    async def crash(_request, error: Exception):
        log.exception("request failed")
        return _error(500, f"internal error: {type(error).__name__}: {error}", "server_error")

    async def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise _ApiError(401, "invalid or missing API key (send Authorization: Bearer KEY)", "authentication_error")

    api = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @api.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": started,
                                            "owned_by": "cllm_rt", "max_model_len": context}]}

    @api.post("/completions")
    async def completions(body: _CompletionRequest, request: Request):
        _check_request(body)
        if isinstance(body.prompt, str):
            prompt = tokenizer(body.prompt)["input_ids"]
        else:
            prompt = body.prompt
            if any(t < 0 or t >= vocab for t in prompt):
                raise _ApiError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        return await _answer(request, body, prompt, body.max_tokens or 16, "text_completion")

    @api.post("/chat/completions")
    async def chat(body: _ChatRequest, request: Request):
        _check_request(body)
        if not getattr(tokenizer, "chat_template", None):
            raise _ApiError(400, "this model's tokenizer has no chat template: use /v1/completions")
        messages = [{"role": m.role, "content": _message_text(m)} for m in body.messages]
        try:
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                   return_dict=True)["input_ids"]
        except Exception as error:  # noqa: BLE001  the template's own checks (roles, order) reject the messages
            raise _ApiError(400, f"the chat template rejected the messages: {error}", param="messages") from None
        return await _answer(request, body, prompt, body.max_completion_tokens or body.max_tokens, "chat.completion")

    def _check_request(body: _Request) -> None:
        if body.model != model_name:
            raise _ApiError(404, f"model {body.model!r} is not served here; this server serves {model_name!r}",
                            "not_found_error", "model")
        _check_greedy(body)

    async def _answer(request: Request, body: _Request, prompt: list[int], max_tokens: int | None, kind: str):
        stop = _stops(body)
        if not prompt:
            raise _ApiError(400, "the prompt is empty", param="prompt")
        if max_tokens is None:  # chat's default: the rest of the context
            max_tokens = context - len(prompt)
            if max_tokens < 1:
                raise _ApiError(400, f"the prompt ({len(prompt)} tokens) fills the model's context ({context})",
                                param="messages")
        try:
            check_positions(model, len(prompt), max_tokens)
        except (ValueError, NotImplementedError) as error:
            raise _ApiError(400, str(error), param="max_tokens") from None
        try:
            generation = engine.submit(prompt, max_tokens, stop)
        except Overloaded as error:
            raise _ApiError(503, f"overloaded: {error}", "server_overloaded") from None
        identity = dict(id=f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}",
                        created=int(time.time()), model=model_name)
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_stream(engine, generation, kind, identity, len(prompt), usage),
                                     media_type="text/event-stream")
        text, finish_reason = await _collect(engine, generation, request)
        if finish_reason is None:  # the client went away
            return Response(status_code=499)
        if kind == "chat.completion":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        return {**identity, "object": kind, "choices": [{**choice, "logprobs": None, "finish_reason": finish_reason}],
                "usage": _usage(len(prompt), generation.tokens)}

    app.include_router(api)

    @app.get("/health")
    async def health():
        if not engine.alive:
            raise _ApiError(503, "the decode thread is not running", "server_error")
        return {"status": "ok", "running": engine.running, "waiting": engine.waiting}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


_ENDPOINTS = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"}


class _CountRequests:
    """Counts answers by endpoint and status (plain ASGI: Starlette's BaseHTTPMiddleware would come between
    a streaming response and the client's disconnect)."""

    def __init__(self, app, counter: Counter):
        self.app, self.counter = app, counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                path = scope["path"]
                self.counter.labels(path if path in _ENDPOINTS else "other", str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


def _sse(payload) -> str:
    # ASCII JSON: no U+2028 or NEL in an event, which some clients' line splitting would cut the event at
    return f"data: {json.dumps(payload)}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _collect(engine: Engine, generation: _Generation, request: Request):
    """The whole text and finish reason, or ``(text so far, None)`` once the client disconnects."""

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    parts = []
    try:
        while True:
            getter = asyncio.ensure_future(generation.events.get())
            await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                engine.cancel(generation)
                return "".join(parts), None
            kind, value = getter.result()
            if kind == "text":
                parts.append(value)
            elif kind == "done":
                return "".join(parts), value
            else:
                raise _ApiError(500, value, "server_error")
    finally:
        watcher.cancel()


async def _stream(engine: Engine, generation: _Generation, kind: str, identity: dict, prompt_tokens: int,
                  usage: bool):
    """Server-sent events: one chunk per text delta, the finish reason, optionally usage, then ``[DONE]``.
    Starlette cancels this generator when the client disconnects; ``finally`` then frees the row."""
    chat = kind == "chat.completion"
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: dict, finish_reason: str | None = None) -> str:
        choice = {"delta": delta} if chat else {"text": delta.get("content", "")}
        return _sse({**identity, "object": obj,
                     "choices": [{"index": 0, **choice, "logprobs": None, "finish_reason": finish_reason}]})

    try:
        if chat:
            yield chunk({"role": "assistant", "content": ""})
        while True:
            event, value = await generation.events.get()
            if event == "text":
                yield chunk({"content": value})
            elif event == "done":
                yield chunk({}, value)
                if usage:
                    yield _sse({**identity, "object": obj, "choices": [],
                                "usage": _usage(prompt_tokens, generation.tokens)})
                break
            else:
                yield _sse({"error": {"message": value, "type": "server_error", "param": None, "code": None}})
                break
        yield "data: [DONE]\n\n"
    finally:
        engine.cancel(generation)


@contextlib.contextmanager
def background(app: FastAPI, host: str = "127.0.0.1", port: int = 0):
    """Serve ``app`` on a uvicorn thread (tests, benchmarks, notebooks); yields the base URL, stops on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="cllm_rt-uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:  # uvicorn offers no event for "listening"
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def serve(spec: str, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          dtype="auto", device=None, model_name: str | None = None, **options) -> None:
    """``cllm-rt serve``: load ``spec`` (a directory or a short name) and serve it until interrupted."""
    from .models import load_model

    model, tokenizer = load_model(spec, dtype=dtype, device=device)
    app = create_app(model, tokenizer, model_name=model_name or str(spec), api_key=api_key, **options)
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without --api-key: anyone who reaches this address can use the model", host)
    uvicorn.run(app, host=host, port=port, log_level="info")
