"""The HTTP side: routes, authorization, errors as OpenAI-style JSON, whole and streamed answers."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import time
import uuid

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..runtime.inputs import check_positions
from .engine import Engine, Generation, Overloaded, Unavailable
from .metrics import Metrics
from ..runtime.sampling import SamplingParams
from .schemas import ApiError, ChatRequest, CompletionRequest, Body, choices, message_text, stops

log = logging.getLogger("cllm_rt.serve")


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status)


def create_app(model, tokenizer, *, model_name: str, api_key: str | None = None, block_size: int = 16,
               drafts="auto", corpus: str = "off", max_batch: int = 16, max_queue: int = 64,
               max_body_bytes: int = 1 << 20) -> FastAPI:
    """The FastAPI app serving ``model`` under ``model_name``; its lifespan starts and stops the decode thread
    (``app.state.engine``). ``api_key`` guards ``/v1`` and ``/metrics``: one key, or several separated by
    commas, one per tenant (None: open; an empty key is refused, as it would otherwise read as a key nobody
    means). ``corpus``: see :class:`Engine`; ``"per-key"`` needs keys."""
    if api_key is not None and not api_key:
        raise ValueError("the API key is empty: give a key, or none to serve without one")
    keys = None if api_key is None else [key.strip() for key in api_key.split(",")]
    if keys is not None and not all(keys):
        raise ValueError("the API key list holds an empty key: separate keys with single commas")
    if corpus == "per-key" and keys is None:
        raise ValueError("corpus 'per-key' keeps one corpus per API key: give keys (--api-key KEY1,KEY2 or "
                         "CLLM_RT_API_KEY)")
    metrics = Metrics()
    engine = Engine(model, tokenizer, block_size=block_size, drafts=drafts, corpus=corpus, max_batch=max_batch,
                    max_queue=max_queue, metrics=metrics)
    context = getattr(model.config, "max_position_embeddings", None)
    window = getattr(model.config, "sliding_window", None)
    room = min(n for n in (context, window, float("inf")) if n is not None)  # positions one request may span
    special = _special_tokens(tokenizer)
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

    @app.exception_handler(ApiError)
    async def api_error(_request, error: ApiError):
        return _error(error.status, error.message, error.kind, error.param)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, error: RequestValidationError):
        first = error.errors()[0]
        if first["type"] == "json_invalid":
            return _error(400, f"the request body is not valid JSON: {first['ctx']['error']} at character "
                          f"{first['loc'][-1]}")
        where = ".".join(str(part) for part in first["loc"][1:]) or "body"
        if first["type"] == "extra_forbidden":
            return _error(400, f"{where}: this field is not supported by this server", param=where)
        return _error(400, f"{where}: {first['msg']}", param=where)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, error: StarletteHTTPException):
        return _error(error.status_code, str(error.detail))

    @app.exception_handler(Exception)
    async def crash(_request, error: Exception):
        log.exception("request failed")
        return _error(500, "internal error (see the server log)", "server_error")

    async def authorize(request: Request) -> None:
        """Let a request with one of the keys through; the key's index becomes its tenant."""
        request.state.tenant = None
        if keys is None:
            return
        given = request.headers.get("authorization", "").encode()
        # every key is compared, in constant time each: how long this takes says nothing of which key matched
        matches = [hmac.compare_digest(given, f"Bearer {key}".encode()) for key in keys]
        if not any(matches):
            raise ApiError(401, "invalid or missing API key (send Authorization: Bearer KEY)", "authentication_error")
        request.state.tenant = matches.index(True)

    guarded = [Depends(authorize)]
    api = APIRouter(prefix="/v1", dependencies=guarded)

    @api.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": started,
                                            "owned_by": "cllm_rt", "max_model_len": context}]}

    @api.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        rows = _check_request(body)
        if isinstance(body.prompt, str):  # off the event loop: a long prompt takes a while
            prompt = await asyncio.to_thread(lambda: tokenizer(body.prompt)["input_ids"])
        elif body.prompt and isinstance(body.prompt[0], str):
            raise ApiError(400, "prompt: a list of strings is a batch of prompts, which this server does not "
                           "serve; send one request per prompt", param="prompt")
        else:
            prompt = body.prompt
            if any(t < 0 or t >= vocab for t in prompt):
                raise ApiError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        return await _answer(request, body, rows, prompt, body.max_tokens or 16, "text_completion")

    @api.post("/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        rows = _check_request(body)
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, "this model's tokenizer has no chat template: use /v1/completions")
        messages = [{"role": m.role, "content": message_text(m)} for m in body.messages]
        prompt = await asyncio.to_thread(_render, messages)  # off the event loop: a long chat takes a while
        return await _answer(request, body, rows, prompt, body.max_completion_tokens or body.max_tokens,
                             "chat.completion")

    def _render(messages: list[dict]) -> list[int]:
        """The chat template's token ids. Content that spells a special token is refused: the template's
        tokenizer would parse it as one, so a user could close their turn and forge a system turn."""
        for message in messages:
            forged = special.search(message["content"]) if special else None
            if forged:
                raise ApiError(400, f"message content contains the special token {forged.group()!r}, which "
                               "only the chat template may write", param="messages")
        try:
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"]
        except Exception as error:  # noqa: BLE001  the template's own checks (roles, order) reject the messages
            raise ApiError(400, f"the chat template rejected the messages: {error}", param="messages") from None

    def _check_request(body: Body) -> list[SamplingParams | None]:
        if body.model != model_name:
            raise ApiError(404, f"model {body.model!r} is not served here; this server serves {model_name!r}",
                            "not_found_error", "model")
        return choices(body)

    async def _answer(request: Request, body: Body, rows: list[SamplingParams | None], prompt: list[int],
                      max_tokens: int | None, kind: str):
        """Decode ``prompt`` once per choice in ``rows`` (each a row of the batch) and answer."""
        stop = stops(body)
        if not prompt:
            raise ApiError(400, "the prompt is empty", param="prompt")
        if max_tokens is None:  # chat's default: the rest of the context (or of the sliding window)
            max_tokens = room - len(prompt)
            if max_tokens < 1:
                raise ApiError(400, f"the prompt ({len(prompt)} tokens) fills the model's context ({room})",
                               param="messages")
        try:
            check_positions(model, len(prompt), max_tokens)
        except (ValueError, NotImplementedError) as error:
            raise ApiError(400, str(error), param="max_tokens") from None
        generations = []
        try:
            for params in rows:
                generations.append(engine.submit(prompt, max_tokens, stop, params, request.state.tenant))
        except Unavailable as error:
            for generation in generations:  # all of the request's choices or none
                engine.cancel(generation)
            if isinstance(error, Overloaded):
                raise ApiError(503, f"overloaded: {error}", "server_overloaded") from None
            raise ApiError(503, str(error), "server_error") from None
        identity = dict(id=f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}",
                        created=int(time.time()), model=model_name)
        if rows[0] is not None:  # the seed that reproduces this answer (choice i used seed + i)
            identity["seed"] = rows[0].seed
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            generation, = generations  # n > 1 with stream was refused
            return _EventStream(engine, generation, _stream(generation, kind, identity, len(prompt), usage))
        answers = await _collect(engine, generations, request)
        if answers is None:  # the client went away
            return Response(status_code=499)
        listed = []
        for index, (text, finish_reason) in enumerate(answers):
            if kind == "chat.completion":
                choice = {"index": index, "message": {"role": "assistant", "content": text}}
            else:
                choice = {"index": index, "text": text}
            listed.append({**choice, "logprobs": None, "finish_reason": finish_reason})
        return {**identity, "object": kind, "choices": listed,
                "usage": _usage(len(prompt), sum(g.tokens for g in generations))}

    app.include_router(api)

    @app.get("/health")
    async def health():
        if engine.broken is not None:
            raise ApiError(503, engine.broken, "server_error")
        if not engine.alive:
            raise ApiError(503, "the decode thread is not running", "server_error")
        return {"status": "ok", "running": engine.running, "waiting": engine.waiting}

    @app.get("/metrics", dependencies=guarded)  # global acceptance and load: the key holder's business
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


async def _collect(engine: Engine, generations: list[Generation], request: Request):
    """Each generation's whole text and finish reason, or None once the client disconnects. However this ends
    (answers, a disconnect, a failed row, the handler cancelled), every row leaves the batch (a no-op once
    done). The queues are read one after the other: the rows keep decoding together meanwhile."""

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    answers = []
    try:
        for generation in generations:
            parts, finish_reason = [], None
            while finish_reason is None:
                getter = asyncio.ensure_future(generation.events.get())
                try:
                    await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if not getter.done():
                        getter.cancel()  # cancelled only once it runs again: done() stays False until then
                if not getter.done():  # the client went away
                    return None
                kind, value = getter.result()
                if kind == "text":
                    parts.append(value)
                elif kind == "done":
                    finish_reason = value
                else:
                    raise ApiError(500, value, "server_error")
            answers.append(("".join(parts), finish_reason))
        return answers
    finally:
        watcher.cancel()
        for generation in generations:
            engine.cancel(generation)


class _EventStream(StreamingResponse):
    """Server-sent events whose row leaves the batch however the response ends: a client gone before the
    first chunk means Starlette never starts the generator, so a ``finally`` inside it would never run."""

    def __init__(self, engine: Engine, generation: Generation, events):
        super().__init__(events, media_type="text/event-stream")
        self.engine, self.generation = engine, generation

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.engine.cancel(self.generation)


async def _stream(generation: Generation, kind: str, identity: dict, prompt_tokens: int, usage: bool):
    """Server-sent events: one chunk per text delta, the finish reason, optionally usage, then ``[DONE]``."""
    chat = kind == "chat.completion"
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: dict, finish_reason: str | None = None) -> str:
        choice = {"delta": delta} if chat else {"text": delta.get("content", "")}
        return _sse({**identity, "object": obj,
                     "choices": [{"index": 0, **choice, "logprobs": None, "finish_reason": finish_reason}]})

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


def _special_tokens(tokenizer) -> re.Pattern | None:
    """A pattern matching the text of any special token of ``tokenizer`` (longest first), or None."""
    texts = set(getattr(tokenizer, "all_special_tokens", ()))
    texts |= {str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False)}
    texts.discard("")
    return re.compile("|".join(map(re.escape, sorted(texts, key=len, reverse=True)))) if texts else None
