"""What a request may hold: the OpenAI request bodies, the checks beyond their types, and the API's error."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_STOPS, MAX_STOP_CHARS = 4, 256

# Fields that ask for what this server cannot do (sampling, penalties, logprobs, tools, JSON mode), with the
# values that ask for nothing: any other value is refused. null is always the default.
_NEUTRAL = {"top_p": (1.0,), "presence_penalty": (0.0,), "frequency_penalty": (0.0,), "repetition_penalty": (1.0,),
            "top_k": (-1, 0, 1), "min_p": (0.0,), "best_of": (1,), "logit_bias": ({},), "logprobs": (False,),
            "top_logprobs": (0,), "echo": (False,), "suffix": ("",), "response_format": ({"type": "text"},),
            "tools": ([],), "tool_choice": ("none",), "functions": ([],), "function_call": ("none",)}


class Body(BaseModel):
    """The fields both endpoints accept: an allowlist. Any other field is refused by name (a client asking for
    ``ignore_eos`` or ``min_tokens`` must not get an answer that silently ignored it); strict types, so that
    ``"12"`` is never read as the token 12. ``user`` and ``seed`` change nothing here (greedy has no seed)."""

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


def check_greedy(body: Body) -> None:
    if body.temperature is not None and body.temperature > 0:
        raise ApiError(400, f"temperature={body.temperature} asks for sampling; this server decodes greedily "
                       "(send temperature 0 or leave it out)", param="temperature")
    if body.n not in (None, 1):
        raise ApiError(400, f"n={body.n}: greedy decoding has one answer per prompt", param="n")
    for name, neutral in _NEUTRAL.items():
        value = getattr(body, name, None)
        # types compared too: logprobs 0 (the chosen token's logprob) is not logprobs false
        if value is not None and not any(type(value) is type(v) and value == v for v in neutral):
            raise ApiError(400, f"{name}={value!r} is not supported: this server decodes the plain greedy argmax",
                           param=name)


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
