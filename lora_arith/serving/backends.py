"""What the HTTP side of ``serve`` (:func:`~lora_arith.serving.app.create_app`) answers chat
requests with: a :class:`Backend`.

The app owns everything about HTTP (the guard, validation with
:func:`~lora_arith.serving.protocol.parse_chat_request`, errors, metrics, the playground); a
backend turns one checked :class:`~lora_arith.serving.protocol.ChatRequest` into a reply. Our own
continuous-batching engine is one backend (:class:`EngineBackend`); the proxies of
:mod:`lora_arith.serving.proxy` (vLLM, llama.cpp's ``llama-server``) are others.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

from lora_arith._internal.errors import LoraArithError, first_line
from lora_arith.serving.protocol import ChatRequest, EngineClosed, EngineFull, RequestError, RowRequest, RowResult

if TYPE_CHECKING:
    from lora_arith.serving.engine import Engine

__all__ = ["Backend", "EngineBackend", "completion_head", "shutting_down", "sse_event", "usage_of"]


def completion_head(model_id: str) -> dict[str, Any]:
    """The fields every completion and chunk starts with: a fresh id, the time, the model."""
    return {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": model_id}


def sse_event(payload: dict[str, Any]) -> str:
    """One server-sent event carrying ``payload`` as JSON."""
    return "data: " + json.dumps(payload) + "\n\n"


SSE_DONE = "data: [DONE]\n\n"
"""The event that ends an OpenAI stream."""


def usage_of(result: RowResult) -> dict[str, int]:
    """The OpenAI ``usage`` object of a finished row."""
    total = result.prompt_tokens + result.completion_tokens
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens, "total_tokens": total}


class Backend:
    """The generating side of a server, behind :func:`~lora_arith.serving.app.create_app`.

    Subclasses implement :meth:`complete`; the rest has defaults. ``observe`` is set by the app
    to its metrics' hook (:meth:`~lora_arith.serving.app.Metrics.observe`): a backend calls it with
    ``"first_token"`` (seconds), ``"finished"`` (a :class:`~lora_arith.serving.protocol.RowResult`,
    seconds) and ``"failed"`` (the error).
    """

    observe: Callable[..., None] | None = None

    def state(self) -> tuple[int, int]:
        """(requests running, requests waiting), for the metrics' gauges."""
        return 0, 0

    def health(self) -> dict[str, Any]:
        """What ``GET /health`` adds to the status, the model and the default preferences."""
        running, waiting = self.state()
        return {"running": running, "queued": waiting}

    def prepare(self, chat: ChatRequest) -> Any:
        """Work on a checked request before :meth:`complete`, in a worker thread (tokenising, for
        our engine); raises :class:`~lora_arith.serving.protocol.RequestError`."""
        return None

    async def complete(self, chat: ChatRequest, prepared: Any, model_id: str) -> "dict[str, Any] | AsyncIterator[str]":
        """The reply to ``chat`` (a completion, or a stream's events when ``chat.stream``), as the
        model ``model_id``. Raises :class:`~lora_arith.serving.protocol.RequestError`, which the
        app answers as an OpenAI-style error with its status."""
        raise NotImplementedError

    def start(self) -> None:
        """Called once before the server accepts connections."""

    def close(self, timeout: float) -> None:
        """Stop: requests still running get ``timeout`` seconds (called from a thread on shutdown,
        and again with 0 when the server has stopped)."""

    def _observe(self, event: str, *values: Any) -> None:
        if self.observe is not None:
            self.observe(event, *values)


def _finish_reason(result: RowResult) -> str:
    return "length" if result.finish_reason == "length" else "stop"


def shutting_down(message: str = "the server is shutting down") -> RequestError:
    """The 503 of a request the server stopped before it ended (at the shutdown deadline)."""
    return RequestError(message, status=503, code="shutting_down", kind="server_error")


def _failure(error: BaseException) -> RequestError:
    """The error a client gets when its row failed in the engine."""
    if isinstance(error, EngineClosed):
        return shutting_down(str(error))
    if isinstance(error, LoraArithError):  # the row's own mix or sampling (logits that overflow): the request's
        return RequestError(f"generation failed: {first_line(error)[:200]}", code="generation_failed")
    return RequestError(f"generation failed: {first_line(error)[:200]}", status=500, kind="server_error")


class EngineBackend(Backend):
    """Our continuous-batching :class:`~lora_arith.serving.engine.Engine`: each request is a row
    with its own mix; prompts are tokenised and checked against the model's context first."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @property
    def observe(self) -> Callable[..., None] | None:  # type: ignore[override]
        return self.engine.observe

    @observe.setter
    def observe(self, hook: Callable[..., None] | None) -> None:
        self.engine.observe = hook

    def state(self) -> tuple[int, int]:
        return self.engine.running, self.engine.queued()

    def health(self) -> dict[str, Any]:
        engine = self.engine
        return {
            "running": engine.running,
            "queued": engine.queued(),
            "generated_tokens": engine.generated_tokens,
            "batch_sizes": list(engine.batch_sizes),
        }

    def prepare(self, chat: ChatRequest) -> list[int]:
        # the chat template needs text in every turn and a user turn last; an empty system or
        # assistant turn (the playground's after an empty reply) has no text to lose
        messages = [m for m in chat.messages if m["content"].strip() or m["role"] == "user"]
        for index, message in enumerate(chat.messages):
            if message["role"] == "user" and not message["content"].strip():
                raise RequestError(f"messages[{index}].content must not be empty", param=f"messages[{index}].content")
        if not messages or messages[-1]["role"] != "user":
            raise RequestError("this model needs the last message to come from the user", param="messages")
        try:
            prompt_ids = self.engine.encode(messages)
        except (LoraArithError, ValueError, UnicodeError) as error:
            raise RequestError(first_line(error)[:200], param="messages") from None
        context = self.engine.context_length
        if len(prompt_ids) >= context:
            message = f"the prompt has {len(prompt_ids)} tokens; this model's context is {context}"
            raise RequestError(message, param="messages", code="context_length_exceeded")
        return prompt_ids

    def start(self) -> None:
        self.engine.start()

    def close(self, timeout: float) -> None:
        self.engine.close(timeout=timeout)

    async def complete(self, chat: ChatRequest, prepared: Any, model_id: str) -> "dict[str, Any] | AsyncIterator[str]":
        prompt_ids: list[int] = prepared
        request = RowRequest(
            prompt_ids=prompt_ids,
            weights=chat.weights,
            max_tokens=min(chat.max_tokens, self.engine.context_length - len(prompt_ids)),
            temperature=chat.temperature,
            top_p=chat.top_p,
            seed=chat.seed,
            stop=chat.stop,
        )
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def put(kind: str, value: Any) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, (kind, value))
            except RuntimeError:  # the event loop is gone (forced shutdown): nobody is listening
                request.cancelled.set()

        if chat.stream:
            request.on_text = lambda text: put("text", text)
        try:
            self.engine.submit(request, lambda result: put("done", result), lambda error: put("error", error))
        except EngineFull as error:
            raise RequestError(str(error), status=429, code="queue_full", kind="server_error") from None
        except EngineClosed as error:
            raise RequestError(str(error), status=503, code="shutting_down", kind="server_error") from None
        head = completion_head(model_id)
        if not chat.stream:
            try:
                kind, value = await events.get()
                while kind == "text":
                    kind, value = await events.get()
            except asyncio.CancelledError:
                request.cancelled.set()
                raise
            if kind == "error":
                raise _failure(value)
            message = {"role": "assistant", "content": value.text}
            choice = {"index": 0, "message": message, "finish_reason": _finish_reason(value), "logprobs": None}
            return {
                **head,
                "object": "chat.completion",
                "choices": [choice],
                "usage": usage_of(value),
                "preferences": request.weights,
            }

        def chunk(delta: dict, finish_reason: str | None = None) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            return sse_event({**head, "object": "chat.completion.chunk", "choices": [choice]})

        async def chunks():
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    kind, value = await events.get()
                    if kind == "text":
                        yield chunk({"content": value})
                    elif kind == "error":
                        yield sse_event(_failure(value).body())
                        break
                    else:
                        yield chunk({}, _finish_reason(value))
                        if chat.include_usage:
                            yield sse_event({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage_of(value)})
                        break
                yield SSE_DONE
            finally:  # the client went away, or the stream ended: either way the row is no longer needed
                request.cancelled.set()

        return chunks()
