"""The HTTP side of ``serve``: a FastAPI app over a :class:`~lora_arith.serving.backends.Backend`
(our continuous-batching engine, or a proxy to vLLM or llama.cpp's ``llama-server``), guarded
for many users, and :func:`run_backend` / :func:`run_server`, which run it under uvicorn.

Routes: ``POST /v1/chat/completions`` and ``GET /v1/models`` (behind the API key, if one is
set), ``GET /health``, ``GET /metrics`` (Prometheus) and the playground at ``GET /``.

The guard, an ASGI layer in front of the app, in this order:

* **Host**: on a loopback address, a ``Host`` header that names anything but a loopback host is
  refused (403), as Jupyter does, so that a DNS-rebinding page cannot read replies;
* **CORS**: off (no CORS headers at all) unless ``allowed_origins`` are given;
* **API key** on ``/v1/*``: ``Authorization: Bearer KEY``, compared in constant time (401);
* **content type**: a POST must be ``application/json`` (415): a cross-site "simple request"
  (``text/plain``) is never served;
* **body**: read in full before the app sees it, at most ``max_request_bytes`` (413, refused
  from ``Content-Length`` before reading when it is given) and within ``request_timeout``
  seconds (408).

Parsing, validation and the backend's preparation (tokenising) run in a worker thread, off the
event loop.
"""


import asyncio
import hmac
import ipaddress
import json
import math
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

from lora_arith._internal.errors import LoraArithError, OptionError
from lora_arith.lora.numerics import finite_number
from lora_arith.serving.backends import Backend, EngineBackend
from lora_arith.serving.protocol import ChatRequest, RequestError, ServerSettings, parse_body, parse_chat_request

if TYPE_CHECKING:
    from lora_arith.model.mixing import PreferenceMixer

__all__ = ["AccessSettings", "Metrics", "check_listen", "create_app", "run_backend", "run_server"]

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


class AccessSettings:
    """Who may use the server and how much they may send.

    Args:
        api_key: the key ``/v1/*`` requires (``None``: none).
        allowed_origins: origins a browser page may call from (CORS); none by default.
        loopback_only: refuse ``Host`` headers that do not name a loopback host (``None``, the
            default: when the server listens on a loopback address).
        max_request_bytes: the largest request body.
        request_timeout: seconds a client has to send a request's headers and body.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        allowed_origins: Sequence[str] = (),
        loopback_only: bool | None = None,
        max_request_bytes: int = 4 * 2**20,
        request_timeout: float = 30.0,
    ) -> None:
        if api_key is not None and not api_key:
            raise OptionError("api_key", "{} must not be empty")
        if api_key is not None and not (api_key.isascii() and api_key.isprintable() and " " not in api_key):
            # an HTTP header carries bytes that clients send as ASCII: another key could never match
            raise OptionError("api_key", "{} must be printable ASCII without spaces")
        if max_request_bytes < 1:
            raise OptionError("max_request_bytes", "{} must be at least 1")
        if finite_number(request_timeout) is None or request_timeout <= 0:
            raise OptionError("request_timeout", "{} must be a positive number of seconds, got {value!r}", value=request_timeout)
        self.api_key, self.allowed_origins = api_key, list(allowed_origins)
        self.loopback_only, self.max_request_bytes, self.request_timeout = (
            loopback_only,
            max_request_bytes,
            request_timeout,
        )


def _is_loopback_host(host: str) -> bool:
    """Whether ``host`` (an address or a name, without the port) is this machine's loopback."""
    host = host.lower()
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    host = host[:-1] if host.endswith(".") else host  # one final dot: the fully qualified name
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def _host_name(header: str) -> str:
    """The host of a ``Host`` header, without its port (the header itself when it is malformed,
    which no loopback name matches)."""
    if header.startswith("["):
        end = header.find("]")
        rest = header[end + 1 :]
        if end < 0 or (rest and not (rest[:1] == ":" and rest[1:].isdigit())):
            return header
        return header[: end + 1]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _error_body(message: str, *, kind: str, code: str | None = None, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}}).encode()


class Metrics:
    """Prometheus metrics of one server (its own registry), in vLLM's spirit: requests, tokens,
    queue depth, batch size and time to first token."""

    def __init__(self, engine_state: Callable[[], tuple[int, int]]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "lora_arith_requests", "Requests answered, by outcome", ["outcome"], registry=self.registry
        )
        self.prompt_tokens = Counter("lora_arith_prompt_tokens", "Prompt tokens prefilled", registry=self.registry)
        self.generation_tokens = Counter(
            "lora_arith_generation_tokens", "Tokens generated", registry=self.registry
        )
        running = Gauge("lora_arith_requests_running", "Rows in the running batch", registry=self.registry)
        waiting = Gauge("lora_arith_requests_waiting", "Requests waiting to join the batch", registry=self.registry)
        running.set_function(lambda: engine_state()[0])
        waiting.set_function(lambda: engine_state()[1])
        self.batch_size = Histogram(
            "lora_arith_batch_size",
            "Rows in each decoding step",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "lora_arith_time_to_first_token_seconds",
            "Seconds from a request's arrival at the engine to its first token",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.latency = Histogram(
            "lora_arith_e2e_request_latency_seconds",
            "Seconds from a request's arrival at the engine to its end",
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=self.registry,
        )

    def observe(self, event: str, *values: Any) -> None:
        """The engine's ``observe`` hook."""
        if event == "step":
            self.batch_size.observe(values[0])
        elif event == "first_token":
            self.time_to_first_token.observe(values[0])
        elif event == "finished":
            result, seconds = values
            self.requests.labels(result.finish_reason).inc()
            self.prompt_tokens.inc(result.prompt_tokens)
            self.generation_tokens.inc(result.completion_tokens)
            self.latency.observe(seconds)
        elif event == "failed":
            self.requests.labels("error").inc()

    def rejected(self, status: int) -> None:
        self.requests.labels(f"rejected_{status}").inc()

    def text(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _headers(scope) -> dict[str, str]:
    return {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}


class _Layer:
    """An ASGI layer that answers some requests itself with an OpenAI-style JSON error."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def _refuse(self, send, status: int, message: str, *, kind: str, code: str, headers=()) -> None:
        self.metrics.rejected(status)
        body = _error_body(message, kind=kind, code=code)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                    *headers,
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _HostCheck(_Layer):
    """Refuses a ``Host`` header that does not name a loopback host (against DNS rebinding)."""

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and not _is_loopback_host(_host_name(_headers(scope).get("host", "localhost"))):
            message = "this server answers only requests addressed to a loopback host"
            return await self._refuse(send, 403, message, kind="permission_error", code="host_not_allowed")
        return await self.app(scope, receive, send)


class _Guard(_Layer):
    """API key, content type and bounded body (see the module docstring)."""

    def __init__(self, app, access: AccessSettings, metrics: Metrics, stopping: asyncio.Event | None = None) -> None:
        super().__init__(app, metrics)
        self.access, self.stopping = access, stopping or asyncio.Event()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = _headers(scope)
        if scope["method"] == "OPTIONS":  # a CORS preflight: the CORS layer above answers it, or nobody
            return await self.app(scope, receive, send)
        path = scope["path"]
        if self.access.api_key is not None and path.startswith("/v1/"):
            given = headers.get("authorization", "")
            token = given[7:] if given[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode("utf-8", "surrogateescape"), self.access.api_key.encode()):
                return await self._refuse(
                    send,
                    401,
                    "a valid API key is required: send 'Authorization: Bearer KEY'",
                    kind="invalid_request_error",
                    code="invalid_api_key",
                    headers=[(b"www-authenticate", b"Bearer")],
                )
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            return await self._refuse(
                send,
                415,
                f"the request body must be application/json, not {content_type[:60] or 'untyped'}",
                kind="invalid_request_error",
                code="unsupported_media_type",
            )
        limit = self.access.max_request_bytes
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            return await self._refuse(send, 413, f"the request body is over {limit} bytes", kind="invalid_request_error", code="request_too_large")
        body = await self._read(receive, limit)
        if isinstance(body, int):
            if body == 0:
                return None  # the client went away
            messages = {
                408: ("the request body did not arrive in time", "request_timeout"),
                413: (f"the request body is over {limit} bytes", "request_too_large"),
                503: ("the server is shutting down", "shutting_down"),
            }
            message, code = messages[body]
            kind = "server_error" if body == 503 else "invalid_request_error"
            return await self._refuse(send, body, message, kind=kind, code=code)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _read(self, receive, limit: int) -> bytes | int:
        """The whole body, or a status: 413 (too large), 408 (too slow), 503 (shutting down), 0 (gone)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.access.request_timeout
        chunks, size = [], 0
        while True:
            remaining = deadline - loop.time()
            get = asyncio.ensure_future(receive())
            stop = asyncio.ensure_future(self.stopping.wait())
            done, _ = await asyncio.wait({get, stop}, timeout=max(remaining, 0), return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if get not in done:
                get.cancel()
                return 503 if self.stopping.is_set() else 408
            message = get.result()
            if message["type"] == "http.disconnect":
                return 0
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return 413
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)


def create_app(
    backend: Backend,
    settings: ServerSettings,
    access: AccessSettings | None = None,
    *,
    stopping: asyncio.Event | None = None,
):
    """The FastAPI app behind its guard (an ASGI app), answering chat requests with ``backend``
    (our engine, :class:`~lora_arith.serving.backends.EngineBackend`, or a proxy of
    :mod:`lora_arith.serving.proxy`). ``stopping``, once set, makes requests whose body is still
    arriving get 503 at once (the server is shutting down)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException

    access = access or AccessSettings()
    metrics = Metrics(backend.state)
    backend.observe = metrics.observe
    app = FastAPI(title="lora-arith", docs_url=None, redoc_url=None, openapi_url=None)
    started = int(time.time())

    def error_response(error: RequestError) -> JSONResponse:
        if error.status < 500:
            metrics.rejected(error.status)
        headers = {"Retry-After": "1"} if error.status == 429 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        message = f"no route {request.method} {request.url.path[:100]}" if error.status_code in (404, 405) else str(error.detail)
        return error_response(RequestError(message, status=error.status_code, kind=kind, code=str(error.status_code)))

    @app.api_route("/health", methods=["GET", "HEAD"])  # monitors often probe with HEAD
    def health():
        return {"status": "ok", "model": settings.model_id, "preferences": settings.defaults, **backend.health()}

    @app.get("/metrics")
    def prometheus():
        body, content_type = metrics.text()
        return Response(body, media_type=content_type)

    card = {"id": settings.model_id, "object": "model", "created": started, "owned_by": "lora-arith"}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model:path}")  # the openai client's models.retrieve
    def model(model: str):
        if model != settings.model_id:
            shown = json.dumps(model)[:80]
            message = f"the model {shown} does not exist; this server serves {settings.model_id!r}"
            return error_response(RequestError(message, param="model", code="model_not_found", status=404))
        return card

    @app.get("/", response_class=HTMLResponse)
    def playground():
        from importlib.resources import files

        page = files("lora_arith.serving").joinpath("playground.html").read_text(encoding="utf-8")
        config = {
            "model": settings.model_id,
            "preferences": settings.defaults,
            "max_eta": settings.max_eta,
            "api_key_required": access.api_key is not None,
        }
        return page.replace("/*CONFIG*/null", json.dumps(config).replace("<", "\\u003c"))

    def prepare(raw: bytes) -> tuple[ChatRequest, Any]:
        """Parse, check and prepare (tokenise, for our engine), in a worker thread."""
        chat = parse_chat_request(parse_body(raw), settings)
        return chat, backend.prepare(chat)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request):
        try:
            chat, prepared = await asyncio.to_thread(prepare, await http.body())
            completing = asyncio.ensure_future(backend.complete(chat, prepared, settings.model_id))
            reply = await _unless_disconnected(completing, http)  # a stream: until its first event
        except RequestError as error:
            return error_response(error)
        if reply is None:  # the client went away: nobody reads this
            return Response(status_code=499)
        if isinstance(reply, dict):
            return reply
        return StreamingResponse(reply, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    guarded: Any = _Guard(app, access, metrics, stopping)
    if access.allowed_origins:
        from starlette.middleware.cors import CORSMiddleware

        guarded = CORSMiddleware(
            guarded,
            allow_origins=access.allowed_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["*"],  # the openai SDKs send their own (x-stainless-*, openai-organization)
        )
    if access.loopback_only is not False:  # first of all, CORS preflights included
        guarded = _HostCheck(guarded, metrics)
    return guarded


async def _unless_disconnected(work: "asyncio.Future[Any]", http: Any) -> Any:
    """``work``'s result, or ``None`` once the client has gone away. A stream learns it when a
    write fails; a non-streamed reply writes nothing until it is done, so its connection is
    watched here (after the body, the next ASGI message is the disconnect), and ``work`` is
    cancelled: the request's row leaves the batch at the next step instead of generating for
    nobody."""

    async def gone() -> None:
        while (await http.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(gone())
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():  # the client went away, or this handler was cancelled (shutdown)
            work.cancel()
    return work.result() if work in done else None


def _protocol(request_timeout: float):
    """uvicorn's h11 protocol, but a connection must send a whole request head within
    ``request_timeout`` seconds of opening (or of its previous response): uvicorn times out only
    idle keep-alive connections, never a new one that sends nothing or half a head."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        def _arm(self) -> None:
            self._head_timer = self.loop.call_later(request_timeout, self._head_timeout)

        def _head_timeout(self) -> None:
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._head_timer.cancel()
            self._arm()

        def connection_lost(self, exc) -> None:
            self._head_timer.cancel()
            super().connection_lost(exc)

    return Protocol


def run_server(
    mixer: "PreferenceMixer",
    *,
    max_batch_size: int = 32,
    max_batch_tokens: int = 32768,
    max_queue: int = 256,
    max_eta: float = 4.0,
    max_tokens: int = 512,
    model_id: str = "lora-arith",
    **server: Any,
) -> None:
    """Serve ``mixer`` on our continuous-batching engine until SIGINT or SIGTERM
    (:func:`run_backend`, which takes ``server``: host, port, ``shutdown_timeout``, ``access``,
    ``announce``)."""
    from lora_arith.serving.engine import Engine

    settings = ServerSettings(model_id, dict(mixer.weights), max_eta, max_tokens)  # checks the defaults
    engine = Engine(mixer, max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens, max_queue=max_queue)
    run_backend(EngineBackend(engine), settings, **server)


def check_listen(host: str, port: int, shutdown_timeout: float = 30.0) -> None:
    """Where :func:`run_backend` listens and how long it waits at shutdown, checked (before
    anything loads): an empty host would listen on every interface, and a NaN or infinite
    timeout would never end."""
    if not isinstance(host, str) or not host.strip():
        raise OptionError("host", "{} must name an address, e.g. 127.0.0.1 (an empty one listens on every interface)")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise OptionError("port", "{} must be 0 (any free port) to 65535, got {port!r}", port=port)
    if finite_number(shutdown_timeout) is None or shutdown_timeout < 0:
        raise OptionError("shutdown_timeout", "{} must be a number of seconds of at least 0, got {value!r}", value=shutdown_timeout)


def run_backend(
    backend: Backend,
    settings: ServerSettings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    shutdown_timeout: float = 30.0,
    access: AccessSettings | None = None,
    announce: Callable[[str], None] = print,
) -> None:
    """Serve ``backend`` behind :func:`create_app` until SIGINT or SIGTERM. Requests still running
    then get ``shutdown_timeout`` seconds to finish; those that do not get a JSON error (or an
    error event and ``[DONE]``). ``port`` 0 picks a free port (announced)."""
    import signal
    import socket

    import uvicorn

    check_listen(host, port, shutdown_timeout)
    access = access or AccessSettings()
    if access.loopback_only is None:
        access.loopback_only = _is_loopback_host(host)
    stopping = asyncio.Event()
    app = create_app(backend, settings, access, stopping=stopping)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # connections made before uvicorn starts wait in the backlog
    except OSError as error:
        sock.close()
        raise LoraArithError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    bound = sock.getsockname()[1]

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            # Requests still arriving are refused; the backend finishes the rest or, at the
            # deadline, fails them, so their handlers answer before uvicorn's own (later) timeout.
            stopping.set()
            threading.Thread(target=backend.close, args=(shutdown_timeout,), daemon=True).start()
            await super().shutdown(sockets)

        def handle_exit(self, sig, frame) -> None:
            # uvicorn's second Ctrl-C cancels every handler at once: plain-text 500s, streams cut
            # without [DONE], a traceback each. Here it ends the backend's grace period instead
            # (what still runs gets its JSON error or error event now); a third one forces the exit.
            interrupts = self._captured_signals.count(signal.SIGINT) + (sig == signal.SIGINT)
            if self.should_exit and sig == signal.SIGINT and interrupts == 2:
                self._captured_signals.append(sig)
                threading.Thread(target=backend.close, args=(0,), daemon=True).start()
                return
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,
        log_level="warning",
        timeout_graceful_shutdown=int(math.ceil(shutdown_timeout)) + 5,
        timeout_keep_alive=5,
        http=_protocol(access.request_timeout),
        lifespan="off",
    )
    server = Server(config)
    # uvicorn re-raises the signal that stopped it once it is done; let that be a no-op so the
    # process ends normally, with status 0.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    backend.start()
    shown = f"[{host}]" if ":" in host else host  # an IPv6 address, bracketed as in a URL
    announce(f"serving {settings.model_id} with {settings.defaults or 'no adapters'} on http://{shown}:{bound}")
    try:
        server.run(sockets=[sock])
    finally:
        backend.close(0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
