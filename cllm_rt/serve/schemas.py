"""What a request may hold: the OpenAI request bodies, the checks beyond their types, and the API's error."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

# Fields some clients send that this server cannot honour (sampling, penalties, logprobs, tools, JSON mode),
# with the values that ask for nothing.
_NEUTRAL = {"top_p": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
            "top_k": (-1, 0, 1), "min_p": 0.0, "best_of": 1, "logit_bias": {}, "logprobs": (False, 0),
            "top_logprobs": 0, "echo": False, "suffix": "", "response_format": {"type": "text"}, "tools": []}


class Body(BaseModel):
    # clients send fields this server does not use (user, seed, ...): accepted; those it cannot honour are
    # refused by check_greedy
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    temperature: float | None = Field(None, ge=0)
    n: int = 1


class CompletionRequest(Body):
    prompt: str | list[int]


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict] | None = None


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
    if body.n != 1:
        raise ApiError(400, f"n={body.n}: greedy decoding has one answer per prompt", param="n")
    extra = body.model_extra or {}
    for name, neutral in _NEUTRAL.items():
        value = extra.get(name)
        if value is not None and value not in (neutral if isinstance(neutral, tuple) else (neutral,)):
            raise ApiError(400, f"{name}={value!r} is not supported: this server decodes the plain greedy argmax",
                            param=name)


def stops(body: Body) -> list[str]:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4:
        raise ApiError(400, f"at most 4 stop sequences, got {len(stop)}", param="stop")
    return stop


def message_text(message: Message) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    if any(part.get("type") != "text" for part in message.content):
        raise ApiError(400, "only text content parts are supported", param="messages")
    return "".join(str(part.get("text", "")) for part in message.content)
