"""The OpenAI chat-completions protocol as ``serve`` speaks it: request validation and errors, and
what a backend is given (:class:`RowRequest`) and gives back (:class:`RowResult`).

Every request is checked in full here, before it joins a batch, within vLLM's bounds (a seed
within int64; a temperature in (0, 1e-2) is raised to 1e-2, as vLLM's ``SamplingParams`` does,
so that dividing the logits by it cannot overflow), so that nothing a client sends can fail the
other rows of its batch.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from typing import Any, Callable, Mapping

from lora_arith._internal.errors import LoraArithError, OptionError, first_line
from lora_arith.lora.numerics import finite_number

__all__ = [
    "ChatRequest",
    "EngineClosed",
    "EngineFull",
    "RequestError",
    "RowRequest",
    "RowResult",
    "ServerSettings",
    "check_defaults",
    "parse_body",
    "parse_chat_request",
    "seed_fits",
]

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
"""Accepted roles and what the chat template sees (``developer`` is OpenAI's newer ``system``)."""
MIN_TEMPERATURE = 1e-2
"""Positive temperatures below this are raised to it (vLLM's ``_MAX_TEMP``)."""
INT64 = (-(2**63), 2**63 - 1)


# -- what a backend is given and gives back (no torch here: the proxies of `serve --engine` use them too)


class EngineFull(LoraArithError):
    """The queue of waiting requests is full (answered 429)."""


class EngineClosed(LoraArithError):
    """The engine is shutting down, or shut down before the request finished."""


@dataclasses.dataclass
class RowRequest:
    """One request as the engine runs it: prompt tokens (chat template applied), mix and sampling."""

    prompt_ids: list[int]
    weights: dict[str, float] = dataclasses.field(default_factory=dict)
    max_tokens: int = 128
    temperature: float = 0.0
    """0: greedy. Anything else samples (validated to at least 1e-2 by the protocol)."""
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = dataclasses.field(default_factory=list)
    on_text: Callable[[str], None] | None = None
    """Called from the engine's thread with each new piece of the reply (for streaming)."""
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    """Set it to stop generating this row (its client went away)."""


@dataclasses.dataclass
class RowResult:
    text: str
    finish_reason: str  # "stop", "length" or "cancelled"
    prompt_tokens: int
    completion_tokens: int


class RequestError(Exception):
    """A request the server refuses: answered with an OpenAI-style error and ``status``."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int = 400,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.kind = message, param, code, status, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclasses.dataclass
class ServerSettings:
    """What the server checks requests against."""

    model_id: str
    defaults: dict[str, float]
    """The server's weight of every attached vector; requests override some of them."""
    max_eta: float = 4.0
    max_tokens: int = 512
    """The largest ``max_tokens`` a request may ask for (and the default)."""

    def __post_init__(self) -> None:
        check_defaults(self.defaults, self.max_eta)


def seed_fits(seed: Any) -> bool:
    """Whether ``seed`` is ``None`` or an integer (not a bool) within int64, vLLM's bound."""
    return seed is None or (type(seed) is int and INT64[0] <= seed <= INT64[1])


def check_defaults(defaults: dict[str, float], max_eta: float) -> None:
    """No default weight may be above ``max_eta`` in size: a request could not ask for it either.
    ``max_eta`` itself must be a positive finite number (a NaN bound would let every weight through)."""
    if finite_number(max_eta) is None or max_eta <= 0:
        raise OptionError("max_eta", "{} must be a positive finite number, got {value!r}", value=max_eta)
    for name, weight in defaults.items():
        if abs(weight) > max_eta:
            raise OptionError(
                "max_eta", "the default weight of {name} ({weight:g}) is above {} {max_eta:g}",
                name=name, weight=weight, max_eta=max_eta,
            )  # fmt: skip


@dataclasses.dataclass
class ChatRequest:
    """A checked chat-completions request."""

    messages: list[dict[str, str]]
    weights: dict[str, float]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool


def parse_body(raw: bytes) -> Any:
    """JSON of a request body; anything unreadable (bad UTF-8 or JSON, nesting past the recursion
    limit, an integer past Python's digit limit) is a :class:`RequestError`."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise RequestError("the request body is nested too deeply") from None
    except (ValueError, UnicodeError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        detail = first_line(error)[:120]
        raise RequestError(f"the request body is not valid JSON ({detail})") from None


def _number(body: Mapping[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    number = finite_number(value)
    if number is None:
        raise RequestError(f"'{key}' must be a finite number", param=key)
    if not low <= number <= high:
        raise RequestError(f"'{key}' must be between {low:g} and {high:g}", param=key)
    return number


def _text(value: Any, param: str) -> str:
    if isinstance(value, list):  # [{"type": "text", "text": ...}, ...]
        if all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value):
            value = "".join(part["text"] for part in value)
    if not isinstance(value, str):
        raise RequestError(f"{param} must be a string", param=param)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"{param} holds a lone surrogate, which is not text", param=param) from None
    return value


def _messages(body: Mapping[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", param="messages")
    parsed = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(f"messages[{index}] must be an object", param=f"messages[{index}]")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise RequestError(
                f"messages[{index}].role must be one of {', '.join(ROLES)}, not {json.dumps(role)[:40]}",
                param=f"messages[{index}].role",
            )
        parsed.append({"role": ROLES[role], "content": _text(message.get("content"), f"messages[{index}].content")})
    if parsed[-1]["role"] == "assistant":
        raise RequestError("the last message must come from the user or the system", param="messages")
    return parsed


UNSUPPORTED = {
    "logprobs": lambda value: value not in (None, False),
    "top_logprobs": lambda value: value not in (None, 0),
    "tool_choice": lambda value: value not in (None, "none", "auto"),  # tools the model may not call: text
    "response_format": lambda value: value is not None and not (isinstance(value, dict) and value.get("type") == "text"),
    "logit_bias": lambda value: value not in (None, {}),
    "presence_penalty": lambda value: value not in (None, 0),
    "frequency_penalty": lambda value: value not in (None, 0),
}
"""OpenAI request fields this server does not implement, and which of their values would ask
for what it does not do (the others, defaults a client may send, are accepted)."""


def _refuse_unsupported(body: Mapping[str, Any]) -> None:
    """A 400 for a field asking for what this server does not do, rather than a reply without it."""
    for name, asks in UNSUPPORTED.items():
        if name in body and asks(body[name]):
            raise RequestError(f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")
    for name in ("tools", "functions"):  # tools offered, unless the model is told not to call them
        if body.get(name) not in (None, []) and body.get("tool_choice", "auto") != "none":
            raise RequestError(f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")


def _weights(body: Mapping[str, Any], settings: ServerSettings) -> dict[str, float]:
    preferences = body.get("preferences")
    preferences = {} if preferences is None else preferences
    if not isinstance(preferences, dict):
        raise RequestError("'preferences' must be an object NAME: WEIGHT", param="preferences")
    weights = dict(settings.defaults)
    for name, value in preferences.items():
        param = f"preferences.{name}"
        if name not in settings.defaults:
            known = ", ".join(settings.defaults) or "none"
            raise RequestError(f"unknown preference {name[:80]!r}; this server has: {known}", param=param)
        number = finite_number(value)
        if number is None:
            raise RequestError(f"the weight of {name!r} must be a finite number", param=param)
        if abs(number) > settings.max_eta:
            raise RequestError(f"|weight| of {name!r} is above this server's limit of {settings.max_eta:g}", param=param)
        weights[name] = number
    return weights


def parse_chat_request(body: Any, settings: ServerSettings) -> ChatRequest:
    """Check an OpenAI chat-completions request body. Raises :class:`RequestError`."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != settings.model_id:
        shown = json.dumps(model)[:80]
        raise RequestError(
            f"the model {shown} does not exist; this server serves {settings.model_id!r}",
            param="model",
            code="model_not_found",
            status=404,
        )
    messages = _messages(body)
    weights = _weights(body, settings)
    n = body.get("n")
    if n is not None and (type(n) is not int or n != 1):
        raise RequestError("only n=1 is supported", param="n")
    _refuse_unsupported(body)
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:  # absent or null: the older name, then the server's limit
        max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = settings.max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 0 < max_tokens <= settings.max_tokens:
        raise RequestError(f"'max_tokens' must be an integer from 1 to {settings.max_tokens}", param="max_tokens")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) and stop else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("'stop' must be a string or a list of up to 4 non-empty strings", param="stop")
    stop = [_text(s, "stop") for s in stop]
    seed = body.get("seed")
    if not seed_fits(seed):
        raise RequestError("'seed' must be an integer within int64", param="seed")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise RequestError("'stream' must be true, false or null", param="stream")
    options = body.get("stream_options") or {}
    temperature = _number(body, "temperature", 0.0, 0.0, 2.0)
    if 0 < temperature < MIN_TEMPERATURE:
        temperature = MIN_TEMPERATURE
    return ChatRequest(
        messages=messages,
        weights=weights,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0) or 1e-9,
        seed=seed,
        stop=stop,
        stream=bool(stream),
        include_usage=bool(isinstance(options, dict) and options.get("include_usage")),
    )
