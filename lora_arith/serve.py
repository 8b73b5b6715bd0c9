"""Serving per-user preferences: an OpenAI-compatible chat server whose requests each carry
their own mix of preference vectors.

Three parts, each usable alone:

* :class:`RowGenerator` runs one batch of chat requests through one ``model.generate`` call,
  each row with its own weights η (:meth:`PreferenceMixer.row_weights`), its own sampling
  (temperature, top_p, seed), ``max_tokens`` and stop strings, and reports each row's text
  as it grows (for streaming);
* :class:`Batcher` collects requests from many threads into batches of at most
  ``max_batch_size``, waiting at most ``max_wait`` after the first, and hands each batch to a
  function on one worker thread;
* :func:`create_app` is the FastAPI app (``/v1/chat/completions``, ``/v1/models``,
  ``/health`` and the playground at ``/``), and :func:`run_server` runs it under uvicorn.
"""

import dataclasses
import math
import queue
import secrets
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch

from lora_arith.errors import LoraArithError, OptionError

if TYPE_CHECKING:
    from lora_arith.mixing import PreferenceMixer

ROLES = ("system", "user", "assistant")


@dataclasses.dataclass
class RowRequest:
    """One chat request as :class:`RowGenerator` runs it."""

    messages: list[dict[str, str]]
    weights: dict[str, float] = dataclasses.field(default_factory=dict)
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = dataclasses.field(default_factory=list)
    on_text: Callable[[str], None] | None = None
    """Called from the generating thread with each new piece of the reply (for streaming)."""
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    """Set it to stop generating this row (its client went away)."""


@dataclasses.dataclass
class RowResult:
    text: str
    finish_reason: str  # "stop", "length" or "cancelled"
    prompt_tokens: int
    completion_tokens: int


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the first occurrence of any stop string, and whether one occurred."""
    positions = [text.find(stop) for stop in stops if stop and stop in text]
    return (text[: min(positions)], True) if positions else (text, False)


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many characters at the end of ``text`` could begin a stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


class _Row:
    """The decoding state of one row: its tokens, its text and what was already streamed."""

    def __init__(self, request: RowRequest, tokenizer, prompt_tokens: int, stop_ids: set[int]) -> None:
        self.request, self.tokenizer, self.stop_ids = request, tokenizer, stop_ids
        self.prompt_tokens = prompt_tokens
        self.tokens: list[int] = []
        self.generated = 0
        self.done: str | None = None
        self.sent = ""
        self.generator = torch.Generator().manual_seed(
            request.seed if request.seed is not None else secrets.randbits(63)
        )

    def text(self) -> str:
        raw = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        return cut_at_stop(raw, self.request.stop)[0].strip()

    def add(self, token: int) -> None:
        self.generated += 1
        if token in self.stop_ids:
            self.done = "stop"
            return
        self.tokens.append(token)
        raw = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut, stopped = cut_at_stop(raw, self.request.stop)
        if stopped:
            self.done = "stop"
        elif self.generated >= self.request.max_tokens:
            self.done = "length"
        elif self.request.on_text is not None:  # stream what can no longer change
            safe = cut[: len(cut) - _held_back(cut, self.request.stop)].lstrip().rstrip()
            safe = safe.rstrip("\ufffd")  # an incomplete UTF-8 character
            self._send(safe)

    def _send(self, text: str) -> None:
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.request.on_text(text[len(self.sent) :])
            self.sent = text

    def finish(self) -> RowResult:
        text = self.text()
        if self.request.on_text is not None:
            self._send(text)
        return RowResult(text, self.done or "length", self.prompt_tokens, self.generated)


class _RowControl:
    """A logits processor and stopping criterion for a batch of :class:`_Row`: samples each
    row with its own temperature, top_p and generator (greedy rows are left to argmax) and
    stops each row at its own end, max_tokens or stop string."""

    def __init__(self, rows: list[_Row]) -> None:
        self.rows = rows

    def process(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for index, row in enumerate(self.rows):
            request = row.request
            if row.done or request.temperature <= 0:
                continue
            logits = scores[index].float() / request.temperature
            probabilities = torch.softmax(logits, dim=-1)
            if request.top_p < 1.0:
                ordered, order = probabilities.sort(descending=True)
                outside = ordered.cumsum(-1) - ordered > request.top_p
                ordered[outside] = 0.0
                probabilities = torch.zeros_like(probabilities).scatter(0, order, ordered)
            token = torch.multinomial(probabilities.cpu(), 1, generator=row.generator).item()
            scores[index] = -math.inf
            scores[index, token] = 0.0
        return scores

    def stop(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        last = input_ids[:, -1].tolist()
        for index, row in enumerate(self.rows):
            if row.done:
                continue
            if row.request.cancelled.is_set():
                row.done = "cancelled"
                continue
            row.add(last[index])
        return torch.tensor([row.done is not None for row in self.rows], device=input_ids.device)


class RowGenerator:
    """Runs a batch of :class:`RowRequest` in one ``generate`` call, each row with its own
    weights, sampling, length and stop strings. Greedy rows give exactly what
    :meth:`PreferenceMixer.generate` gives for the same prompt and weights."""

    def __init__(self, mixer: "PreferenceMixer") -> None:
        from lora_arith.generation import end_of_turn_ids

        self.mixer = mixer
        self.tokenizer = mixer.tokenizer
        self.stop_ids = set(end_of_turn_ids(self.tokenizer))
        self.context_length = _context_length(mixer.model)
        self.lock = threading.Lock()  # one batch at a time
        self.tokenizer_lock = threading.Lock()  # encoding with padding changes the tokenizer's state
        self.generated_tokens = 0
        self.running = 0

    def prompt_tokens(self, messages: Sequence[Mapping[str, str]]) -> int:
        """The number of tokens of ``messages`` through the chat template."""
        from lora_arith.generation import chat_prompt

        text = chat_prompt(self.tokenizer, list(messages))
        with self.tokenizer_lock:
            return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @torch.no_grad()
    def run(self, requests: Sequence[RowRequest]) -> list[RowResult]:
        from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

        from lora_arith.generation import chat_prompt

        texts = [chat_prompt(self.tokenizer, request.messages) for request in requests]
        with self.lock:
            with self.tokenizer_lock:
                padding_side = self.tokenizer.padding_side
                self.tokenizer.padding_side = "left"
                try:
                    encoded = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
                finally:
                    self.tokenizer.padding_side = padding_side
            widths = encoded["attention_mask"].sum(-1).tolist()
            rows = [_Row(r, self.tokenizer, int(w), self.stop_ids) for r, w in zip(requests, widths)]
            control = _RowControl(rows)

            class Sample(LogitsProcessor):
                def __call__(self, input_ids, scores):
                    return control.process(input_ids, scores)

            class Stop(StoppingCriteria):
                def __call__(self, input_ids, scores, **kwargs):
                    return control.stop(input_ids, scores)

            device = next(self.mixer.model.parameters()).device
            self.running = len(rows)
            try:
                with self.mixer.row_weights([request.weights for request in requests]):
                    self.mixer.model.generate(
                        **encoded.to(device),
                        max_new_tokens=max(request.max_tokens for request in requests),
                        eos_token_id=sorted(self.stop_ids),
                        pad_token_id=self.tokenizer.pad_token_id,
                        do_sample=False,
                        temperature=None,
                        top_p=None,
                        top_k=None,
                        logits_processor=LogitsProcessorList([Sample()]),
                        stopping_criteria=StoppingCriteriaList([Stop()]),
                    )
            finally:
                self.running = 0
                self.generated_tokens += sum(row.generated for row in rows)
        return [row.finish() for row in rows]


def _context_length(model) -> int:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


@dataclasses.dataclass
class Job:
    """A request waiting for, or in, a batch: ``request`` and how to report back."""

    request: RowRequest
    on_done: Callable[[RowResult], None]
    on_error: Callable[[BaseException], None]


class Batcher:
    """Collects jobs into batches on one worker thread.

    The first job of a batch waits at most ``max_wait`` seconds for others; a batch holds at
    most ``max_batch_size`` jobs. Jobs cancelled while waiting are dropped. ``run_batch``
    gets the requests of a batch and returns one result per request; if it raises, every job
    of the batch gets the error.
    """

    def __init__(
        self,
        run_batch: Callable[[list[RowRequest]], list[RowResult]],
        *,
        max_batch_size: int = 16,
        max_wait: float = 0.02,
    ) -> None:
        if max_batch_size < 1:
            raise OptionError("max_batch_size", "{} must be at least 1")
        if max_wait < 0:
            raise OptionError("max_wait_ms", "{} must not be negative")
        self.run_batch, self.max_batch_size, self.max_wait = run_batch, max_batch_size, max_wait
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="lora-arith-batcher", daemon=True)
        self._closed = False
        self.batch_sizes: list[int] = []

    def start(self) -> "Batcher":
        self._thread.start()
        return self

    def submit(self, job: Job) -> None:
        if self._closed:
            raise LoraArithError("the server is shutting down")
        self._queue.put(job)

    def queued(self) -> int:
        return self._queue.qsize()

    def close(self, timeout: float | None = None) -> None:
        """Stop taking jobs; finish the queued ones, then stop the worker (wait up to ``timeout``)."""
        self._closed = True
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _collect(self) -> tuple[list[Job], bool]:
        first = self._queue.get()
        if first is None:
            return [], True
        batch, deadline = [first], time.monotonic() + self.max_wait
        while len(batch) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)  # stop after this batch
                break
            batch.append(job)
        return batch, False

    def _loop(self) -> None:
        while True:
            batch, stop = self._collect()
            if stop:
                return
            batch = [job for job in batch if not job.request.cancelled.is_set()]
            if not batch:
                continue
            self.batch_sizes.append(len(batch))
            try:
                results = self.run_batch([job.request for job in batch])
            except BaseException as error:  # noqa: BLE001 - reported to every waiting client
                for job in batch:
                    job.on_error(error)
                continue
            for job, result in zip(batch, results):
                job.on_done(result)


class RequestError(Exception):
    """A bad request: answered with an OpenAI-style error and ``status``."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status

    def body(self) -> dict[str, Any]:
        return {
            "error": {"message": self.message, "type": "invalid_request_error", "param": self.param, "code": self.code}
        }


@dataclasses.dataclass
class ServerSettings:
    """What the server checks requests against."""

    model_id: str
    defaults: dict[str, float]
    """The server's weight of every attached vector; requests override some of them."""
    max_eta: float = 4.0
    max_tokens: int = 512
    """The largest ``max_tokens`` a request may ask for (and the default)."""
    context_length: int = 2048


def _number(body: Mapping[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"'{key}' must be a number", param=key)
    if not low <= value <= high:
        raise RequestError(f"'{key}' must be between {low:g} and {high:g}", param=key)
    return float(value)


def _content(message: Mapping[str, Any], index: int) -> str:
    content = message.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        if all(
            isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            for part in content
        ):
            return "".join(part["text"] for part in content)
    if not isinstance(content, str):
        raise RequestError(f"messages[{index}].content must be a string", param=f"messages[{index}].content")
    return content


def parse_chat_request(body: Any, settings: ServerSettings) -> tuple[RowRequest, bool, bool]:
    """Check an OpenAI chat-completions request body; returns the row request, whether to
    stream, and whether the stream ends with a usage chunk. Raises :class:`RequestError`."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", param="messages")
    parsed = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(f"messages[{index}] must be an object", param=f"messages[{index}]")
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(
                f"messages[{index}].role must be one of {', '.join(ROLES)}, not {role!r}",
                param=f"messages[{index}].role",
            )
        parsed.append({"role": role, "content": _content(message, index)})
    if parsed[-1]["role"] == "assistant":
        raise RequestError("the last message must come from the user or the system", param="messages")
    preferences = body.get("preferences") or {}
    if not isinstance(preferences, dict):
        raise RequestError("'preferences' must be an object NAME: WEIGHT", param="preferences")
    weights = dict(settings.defaults)
    for name, value in preferences.items():
        if name not in settings.defaults:
            known = ", ".join(settings.defaults) or "none"
            raise RequestError(f"unknown preference {name!r}; this server has: {known}", param=f"preferences.{name}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RequestError(f"the weight of {name!r} must be a finite number", param=f"preferences.{name}")
        if abs(value) > settings.max_eta:
            raise RequestError(
                f"|weight| of {name!r} is above this server's limit of {settings.max_eta:g}",
                param=f"preferences.{name}",
            )
        weights[name] = float(value)
    if body.get("n", 1) != 1:
        raise RequestError("only n=1 is supported", param="n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = settings.max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 0 < max_tokens <= settings.max_tokens:
        raise RequestError(f"'max_tokens' must be an integer from 1 to {settings.max_tokens}", param="max_tokens")
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("'stop' must be a string or a list of up to 4 non-empty strings", param="stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError("'seed' must be an integer", param="seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be true or false", param="stream")
    options = body.get("stream_options") or {}
    request = RowRequest(
        messages=parsed,
        weights=weights,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0) or 1e-9,
        seed=seed,
        stop=stop,
    )
    return request, stream, bool(isinstance(options, dict) and options.get("include_usage"))


def create_app(generator: RowGenerator, batcher: Batcher, settings: ServerSettings):
    """The FastAPI app: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``, ``GET /``."""
    import asyncio
    import json

    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

    app = FastAPI(title="lora-arith", docs_url=None, redoc_url=None, openapi_url=None)
    started = int(time.time())

    def error_response(error: RequestError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.get("/health")
    def health():
        return {
            "status": "ok",
            "model": settings.model_id,
            "preferences": settings.defaults,
            "running": generator.running,
            "queued": batcher.queued(),
            "generated_tokens": generator.generated_tokens,
            "batch_sizes": batcher.batch_sizes[-100:],
        }

    @app.get("/v1/models")
    def models():
        card = {"id": settings.model_id, "object": "model", "created": started, "owned_by": "lora-arith"}
        return {"object": "list", "data": [card]}

    @app.get("/", response_class=HTMLResponse)
    def playground():
        from importlib.resources import files

        page = files("lora_arith").joinpath("playground.html").read_text(encoding="utf-8")
        config = {"model": settings.model_id, "preferences": settings.defaults, "max_eta": settings.max_eta}
        return page.replace("/*CONFIG*/null", json.dumps(config).replace("<", "\\u003c"))

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request):
        try:
            body = json.loads(await http.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error_response(RequestError("the request body is not valid JSON"))
        try:
            request, stream, include_usage = parse_chat_request(body, settings)
            prompt_tokens = generator.prompt_tokens(request.messages)
        except RequestError as error:
            return error_response(error)
        except LoraArithError as error:
            return error_response(RequestError(str(error), param="messages"))
        if prompt_tokens >= settings.context_length:
            message = f"the prompt has {prompt_tokens} tokens; this model's context is {settings.context_length}"
            return error_response(RequestError(message, param="messages", code="context_length_exceeded"))
        request.max_tokens = min(request.max_tokens, settings.context_length - prompt_tokens)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def put(kind: str, value: Any) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, (kind, value))
            except RuntimeError:  # the event loop is gone (forced shutdown): nobody is listening
                request.cancelled.set()

        if stream:
            request.on_text = lambda text: put("text", text)
        try:
            batcher.submit(Job(request, lambda result: put("done", result), lambda error: put("error", error)))
        except LoraArithError as error:
            return error_response(RequestError(str(error), status=503, code="shutting_down"))
        identifier = f"chatcmpl-{secrets.token_hex(12)}"
        created = int(time.time())
        head = {"id": identifier, "created": created, "model": settings.model_id}

        def usage(result: RowResult) -> dict[str, int]:
            total = result.prompt_tokens + result.completion_tokens
            return {
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "total_tokens": total,
            }

        if not stream:
            try:
                kind, value = await events.get()
                while kind == "text":
                    kind, value = await events.get()
            except asyncio.CancelledError:
                request.cancelled.set()
                raise
            if kind == "error":
                return JSONResponse(
                    {
                        "error": {
                            "message": f"generation failed: {value}",
                            "type": "server_error",
                            "param": None,
                            "code": None,
                        }
                    },
                    status_code=500,
                )
            return {
                **head,
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": value.text},
                        "finish_reason": "length" if value.finish_reason == "length" else "stop",
                        "logprobs": None,
                    }
                ],
                "usage": usage(value),
                "preferences": request.weights,
            }

        def chunk(delta: dict, finish_reason: str | None = None, **extra: Any) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            return (
                "data: "
                + json.dumps({**head, "object": "chat.completion.chunk", "choices": [choice], **extra})
                + "\n\n"
            )

        async def chunks():
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    kind, value = await events.get()
                    if kind == "text":
                        yield chunk({"content": value})
                    elif kind == "error":
                        error = {"message": f"generation failed: {value}", "type": "server_error"}
                        yield "data: " + json.dumps({"error": error}) + "\n\n"
                        break
                    else:
                        yield chunk({}, "length" if value.finish_reason == "length" else "stop")
                        if include_usage:
                            yield "data: " + json.dumps(
                                {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(value)}
                            ) + "\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:  # the client went away, or the stream ended: either way the row is no longer needed
                request.cancelled.set()

        return StreamingResponse(chunks(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def run_server(
    mixer: "PreferenceMixer",
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch_size: int = 16,
    max_wait_ms: float = 20.0,
    max_eta: float = 4.0,
    max_tokens: int = 512,
    shutdown_timeout: float = 30.0,
    model_id: str = "lora-arith",
    announce: Callable[[str], None] = print,
) -> None:
    """Serve ``mixer`` until SIGINT or SIGTERM; running requests then get ``shutdown_timeout``
    seconds to finish. ``port`` 0 picks a free port (announced)."""
    import signal
    import socket

    import uvicorn

    for name, weight in mixer.weights.items():
        if abs(weight) > max_eta:
            raise OptionError("max_eta", "the default weight of {name} is above {} {max_eta:g}", name=name, max_eta=max_eta)
    generator = RowGenerator(mixer)
    settings = ServerSettings(model_id, dict(mixer.weights), max_eta, max_tokens, generator.context_length)
    batcher = Batcher(generator.run, max_batch_size=max_batch_size, max_wait=max_wait_ms / 1000)
    app = create_app(generator, batcher, settings)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise LoraArithError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    bound = sock.getsockname()[1]
    config = uvicorn.Config(
        app, log_level="warning", timeout_graceful_shutdown=int(math.ceil(shutdown_timeout)), lifespan="off"
    )
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal that stopped it once it is done; let that be a no-op so the
    # process ends normally, with status 0.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    batcher.start()
    announce(f"serving {model_id} with {settings.defaults or 'no adapters'} on http://{host}:{bound}")
    try:
        server.run(sockets=[sock])
    finally:
        batcher.close(timeout=shutdown_timeout)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
