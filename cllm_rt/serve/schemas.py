"""What a request may hold: the OpenAI request bodies, the checks beyond their types, and the API's error."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..runtime.sampling import SamplingParams, random_seed

MAX_STOPS, MAX_STOP_CHARS = 4, 256

MAX_N = 8  # choices per request: each is a row of the batch

# Fields that ask for what this server cannot do (penalties, logprobs, tools, JSON mode), with the values that
# ask for nothing: any other value is refused. null is always the default. Penalties depend on the prefix, so
# a tree's branches would each need their own; they are refused rather than approximated.
_NEUTRAL = {"presence_penalty": (0.0,), "frequency_penalty": (0.0,), "repetition_penalty": (1.0,),
            "best_of": (1,), "logit_bias": ({},), "logprobs": (False,),
            "top_logprobs": (0,), "echo": (False,), "suffix": ("",), "response_format": ({"type": "text"},),
            "tools": ([],), "tool_choice": ("none",), "functions": ([],), "function_call": ("none",)}


class Body(BaseModel):
    """The fields both endpoints accept: an allowlist. Any other field is refused by name (a client asking for
    ``ignore_eos`` or ``min_tokens`` must not get an answer that silently ignored it); strict types, so that
    ``"12"`` is never read as the token 12. ``user`` changes nothing here."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: dict | None = None
    temperature: float | None = Field(None, ge=0)
    n: int | None = None
    user: str | None = None
    seed: int | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    logit_bias: dict | None = None
    logprobs: bool | int | None = None  # completions: an int (0 asks for the chosen token's); chat: a bool
    top_logprobs: int | None = None
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None
    function_call: str | dict | None = None


class CompletionRequest(Body):
    prompt: str | list[int] | list[str]  # a list of strings (a batch) is refused by the route, by name
    best_of: int | None = None
    echo: bool | None = None
    suffix: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    # roles the chat template renders as turns; "tool" messages need tools, which this server does not run
    role: Literal["system", "user", "assistant"]
    content: str | list[dict] | None = None
    name: None = None  # participant names: templates drop them, so one would be ignored in silence


class ChatRequest(Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def choices(body: Body) -> list[SamplingParams | None]:
    """The request's choices, each a row's sampling (None: greedy), after refusing what cannot be honoured.

    No temperature, or 0, is greedy decoding (the runtime's exact path; OpenAI's default would be 1), where
    top_p, top_k and min_p change nothing, as the argmax always passes them. With a temperature each of the
    ``n`` choices samples with seed ``seed + i``; a request without a seed gets a random one, returned in the
    answer, so that any answer can be reproduced."""
    for name, neutral in _NEUTRAL.items():
        value = getattr(body, name, None)
        # types compared too: logprobs 0 (the chosen token's logprob) is not logprobs false
        if value is not None and not any(type(value) is type(v) and value == v for v in neutral):
            raise ApiError(400, f"{name}={value!r} is not supported by this server", param=name)
    n = 1 if body.n is None else body.n
    if not 1 <= n <= MAX_N:
        raise ApiError(400, f"n must be between 1 and {MAX_N}, got {n}", param="n")
    temperature = float(body.temperature or 0)
    if temperature == 0 and n > 1:
        raise ApiError(400, f"n={n}: greedy decoding has one answer per prompt (send a temperature > 0)", param="n")
    if n > 1 and body.stream:
        raise ApiError(400, f"n={n} with stream is not supported: stream one choice per request", param="n")
    top_k = 0 if body.top_k in (None, -1) else body.top_k  # -1: vLLM's spelling of "off"
    seed = random_seed() if body.seed is None else body.seed
    try:
        rows = [SamplingParams(temperature, top_k, 1.0 if body.top_p is None else body.top_p,
                               0.0 if body.min_p is None else body.min_p, seed + i) for i in range(n)]
    except ValueError as error:
        raise ApiError(400, str(error), param=str(error).split()[0]) from None
    return [None] if temperature == 0 else rows


def stops(body: Body) -> list[str]:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOPS:
        raise ApiError(400, f"at most {MAX_STOPS} stop sequences, got {len(stop)}", param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise ApiError(400, f"stop sequences may be at most {MAX_STOP_CHARS} characters long", param="stop")
    return stop


def message_text(message: Message) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    if any(part.get("type") != "text" for part in message.content):
        raise ApiError(400, "only text content parts are supported", param="messages")
    return "".join(str(part.get("text", "")) for part in message.content)
