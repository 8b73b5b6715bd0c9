"""``serve`` shared by many users: isolation, access control, bounded input, backpressure,
timeouts, shutdown, metrics and OpenAI conformance, on a live server on 127.0.0.1.

Each test here failed on the static batcher this engine replaced (commit c6acb08)."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from serving_helpers import Server


KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
GOOD = {"model": "lora-arith", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6}


@pytest.fixture(scope="module")
def server(chat_base, two_adapters):
    helpful, harmless = two_adapters
    server = Server(
        "--base", str(chat_base),
        "--adapter", f"helpful={helpful}", "--adapter", f"harmless={harmless}",
        "--api-key", KEY,
        "--allowed-origin", "http://allowed.example",
        "--max-batch-size", "2", "--max-queue", "2",
        "--max-request-bytes", "65536", "--request-timeout", "1",
        "--max-tokens", "480", "--shutdown-timeout", "0",
    )  # fmt: skip
    yield server.wait()
    server.stop(signal.SIGKILL)


def post(server, body, headers=AUTH, path="/v1/chat/completions"):
    return server.request(path, body, headers)


def raw_exchange(server, data: bytes, wait: float = 10) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes it (or ``wait`` passes)."""
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as connection:
        connection.sendall(data)
        received = b""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                chunk = connection.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                return received
            received += chunk
        raise AssertionError(f"the server kept the connection open for {wait} s; got {received[:200]!r}")


def test_api_key_is_required_on_v1_only(server):
    for path, body in (("/v1/models", None), ("/v1/chat/completions", GOOD)):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            status, reply, sent = server.request(path, body, headers)
            assert status == 401 and reply["error"]["code"] == "invalid_api_key", (path, headers, reply)
            assert sent.get("www-authenticate") == "Bearer"
    assert post(server, GOOD)[0] == 200
    for path in ("/health", "/metrics", "/"):  # open: probes, scrapers and the playground page
        with __import__("urllib.request").request.urlopen(server.url + path, timeout=10) as response:
            assert response.status == 200


def test_the_openai_client_sends_the_key(server, openai):
    client = server.client(api_key=KEY)
    assert [model.id for model in client.models.list().data] == ["lora-arith"]
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="nope").models.list()


def test_only_json_is_served_and_only_to_loopback_hosts(server):
    status, reply, _ = server.request("/v1/chat/completions", json.dumps(GOOD).encode(), {**AUTH, "Content-Type": "text/plain"})
    assert status == 415 and reply["error"]["code"] == "unsupported_media_type"
    for host in ("evil.example", "evil.example:80", "127.0.0.1.nip.io", "10.0.0.1"):
        status, reply, _ = server.request("/health", None, {"Host": host})
        assert status == 403 and reply["error"]["code"] == "host_not_allowed", host
    for host in ("localhost", "127.0.0.1:1234", "[::1]:80", "app.localhost"):
        assert server.request("/health", None, {"Host": host})[0] == 200, host


def test_cors_only_for_the_allowed_origin(server):
    # the openai SDKs' own headers too (they got 400 "Disallowed CORS headers")
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type,x-stainless-os,openai-organization"}
    port = int(server.url.rsplit(":", 1)[1])
    for origin, allowed in (("http://allowed.example", True), ("http://evil.example", False)):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("OPTIONS", "/v1/chat/completions", headers={"Origin": origin, **preflight})
        response = connection.getresponse()
        response.read()
        assert (response.getheader("access-control-allow-origin") == origin) is allowed, origin
        assert (response.status == 200) is allowed, (origin, response.status)
        connection.close()
        _, _, headers = post(server, GOOD, {**AUTH, "Origin": origin})
        assert (headers.get("access-control-allow-origin") == origin) is allowed


def test_bodies_over_the_limit_get_413_before_they_are_read(server):
    big = json.dumps({**GOOD, "messages": [{"role": "user", "content": "x" * 70000}]}).encode()
    status, reply, _ = post(server, big)
    assert status == 413 and reply["error"]["code"] == "request_too_large"
    # a 10 MB body announced by its Content-Length: refused from the header, nothing read
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {10 * 2**20}\r\n\r\n"
    ).encode()
    started = time.monotonic()
    reply = raw_exchange(server, head + b"{")
    assert reply.startswith(b"HTTP/1.1 413") and time.monotonic() - started < 5
    # chunked, with no Content-Length: counted as it arrives
    chunked = head.replace(f"Content-Length: {10 * 2**20}".encode(), b"Transfer-Encoding: chunked")
    chunk = b"x" * 40000
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(2)) + b"0\r\n\r\n"
    assert raw_exchange(server, chunked + body).startswith(b"HTTP/1.1 413")


MALFORMED = [
    (b"[" * 20000 + b"]" * 20000, "nested too deeply"),
    (json.dumps(GOOD).encode()[:-1] + b', "seed": ' + b"1" * 5000 + b"}", "not valid JSON"),
    (json.dumps({**GOOD, "temperature": 10**400}).encode(), "'temperature' must be a finite number"),
    (json.dumps({**GOOD, "preferences": {"helpful": 10**400}}).encode(), "finite number"),
    (json.dumps({**GOOD, "messages": [{"role": "user", "content": "\ud800"}]}).encode(), "lone surrogate"),
    (json.dumps({**GOOD, "stop": ["\udfff"]}).encode(), "lone surrogate"),
    (json.dumps({**GOOD, "seed": 2**64}).encode(), "int64"),
    (json.dumps({**GOOD, "seed": 10**30}).encode(), "int64"),
    (b"\xff\xfe{}", "not valid JSON"),
    # each was accepted and then answered without what it asked for, or taken as a default
    *((json.dumps({**GOOD, name: value}).encode(), f"'{name}' is not supported") for name, value in (
        ("logprobs", True), ("top_logprobs", 2), ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("tool_choice", "required"), ("response_format", {"type": "json_object"}), ("logit_bias", {"1": 5}),
        ("presence_penalty", 0.5), ("frequency_penalty", 1),
    )),  # fmt: skip
    *((json.dumps({**GOOD, "n": value}).encode(), "only n=1") for value in (True, 1.0, 2)),
    *((json.dumps({**GOOD, "stop": value}).encode(), "'stop' must be") for value in ("", False, 0)),
    *((json.dumps({**GOOD, "preferences": value}).encode(), "'preferences' must be") for value in ([], 0, False, "")),
    # what this model's chat template cannot take, said in the protocol's words (it was "bad prompt:
    # prompt message 1 ...", counted from 1)
    (json.dumps({**GOOD, "messages": [*GOOD["messages"], {"role": "system", "content": "x"}]}).encode(),
     "this model needs the last message to come from the user"),
    (json.dumps({**GOOD, "messages": [{"role": "user", "content": " "}]}).encode(), "messages[0].content must not be empty"),
]
ACCEPTED = [  # what clients send by default, or asks for nothing this server lacks
    {**GOOD, "messages": [{"role": "system", "content": ""}, *GOOD["messages"]]},
    {**GOOD, "messages": [*GOOD["messages"], {"role": "assistant", "content": ""}, *GOOD["messages"]]},  # playground
    {**GOOD, "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none"},
    {**GOOD, "response_format": {"type": "text"}, "logprobs": False, "top_logprobs": 0, "presence_penalty": 0},
    {**GOOD, "n": 1, "stop": None, "preferences": None, "max_completion_tokens": None},
]


def test_client_mistakes_get_400_and_leave_no_traceback(server):
    assert b"1" * 5000 in MALFORMED[1][0]  # an integer over Python's 4,300-digit limit
    for body, message in MALFORMED:
        status, reply, _ = post(server, body)
        assert status == 400 and message in reply["error"]["message"], (body[:60], reply)
    for body in ACCEPTED:
        status, reply, _ = post(server, body)
        assert status == 200, (body, reply)
    assert not any("Traceback" in line for line in server.lines), "".join(server.lines)


def test_a_tiny_temperature_is_raised_not_fatal_to_the_batch(server):
    """vLLM raises temperatures in (0, 1e-2) to 1e-2; those rows sample, and greedy rows batched
    with them keep their text."""
    alone = post(server, GOOD)[1]["choices"][0]["message"]["content"]
    sampled = []
    for temperature in (1e-40, 1e-300):  # each beside a greedy row (the server decodes 2 rows at most)
        with ThreadPoolExecutor(2) as pool:
            tiny, greedy = pool.map(lambda body: post(server, body), [{**GOOD, "temperature": temperature, "seed": 3}, GOOD])
        assert tiny[0] == 200 and greedy[0] == 200, (tiny, greedy)
        assert greedy[1]["choices"][0]["message"]["content"] == alone
        sampled.append(tiny[1]["choices"][0]["message"]["content"])
    assert sampled[0] == sampled[1]  # both sampled at 1e-2 with the same seed


def test_a_short_request_does_not_wait_for_a_long_one(server):
    """Head-of-line blocking: an 8-token request sent while a 400-token stream runs is answered
    while that stream still runs (a static batcher answers it only after the long one ends)."""
    port = int(server.url.rsplit(":", 1)[1])
    long = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = {**GOOD, "max_tokens": 400, "stream": True, "stop": ["never seen"]}
    long.request("POST", "/v1/chat/completions", json.dumps(body), {**AUTH, "Content-Type": "application/json"})
    response = long.getresponse()
    assert response.readline().startswith(b"data: ")  # the long row is decoding
    status, reply, _ = post(server, {**GOOD, "max_tokens": 8})
    assert status == 200 and reply["usage"]["completion_tokens"] <= 8
    assert server.request("/health")[1]["running"] == 1, "the long stream had already ended"
    events = [line for line in response.read().decode().split("\n\n") if line.strip()]
    assert '"finish_reason": "length"' in events[-2] and events[-1] == "data: [DONE]"  # it ran to 400 tokens
    long.close()


def test_openai_conformance(server, openai):
    status, reply, _ = post(server, {**GOOD, "stream": None, "messages": [{"role": "developer", "content": "Be brief."}, *GOOD["messages"]]})
    assert status == 200 and reply["choices"][0]["message"]["content"] is not None
    status, reply, _ = post(server, {**GOOD, "model": "gpt-4o"})
    assert status == 404 and reply["error"]["code"] == "model_not_found" and "'lora-arith'" in reply["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        server.client(api_key=KEY).chat.completions.create(model="gpt-4o", messages=GOOD["messages"])
    for path in ("/v1/completions", "/nope"):
        status, reply, _ = server.request(path, None, AUTH)
        assert status == 404 and reply["error"]["type"] == "not_found_error", path
    # max_completion_tokens: null falls back to max_tokens (the server's limit of 480 was taken)
    status, reply, _ = post(server, {**GOOD, "max_completion_tokens": None, "max_tokens": 3})
    assert status == 200 and reply["usage"]["completion_tokens"] <= 3
    assert server.client(api_key=KEY).models.retrieve("lora-arith").id == "lora-arith"  # was 404
    with pytest.raises(openai.NotFoundError):
        server.client(api_key=KEY).models.retrieve("gpt-4o")
    head = urllib.request.Request(server.url + "/health", method="HEAD")  # monitors' probe: was 405
    with urllib.request.urlopen(head, timeout=10) as response:
        assert response.status == 200


def test_a_full_queue_answers_429_with_retry_after(server):
    """At most 2 requests wait (and 2 rows decode): of 10 long requests sent at once, at least 2
    are served (how many more depends on how many joined the batch before the queue filled), and
    the rest are turned away."""
    body = {**GOOD, "max_tokens": 200}
    with ThreadPoolExecutor(10) as pool:
        replies = list(pool.map(lambda _: post(server, body), range(10)))
    statuses = sorted(status for status, _, _ in replies)
    assert statuses.count(200) >= 2 and statuses.count(429) >= 1 and set(statuses) == {200, 429}, statuses
    refused = next(reply for reply in replies if reply[0] == 429)
    assert refused[2].get("retry-after") == "1" and refused[1]["error"]["code"] == "queue_full"


def test_slow_and_silent_connections_are_closed(server):
    started = time.monotonic()
    assert raw_exchange(server, b"") == b""  # connects and sends nothing
    assert raw_exchange(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: local") == b""  # half a head
    half_body = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {KEY}\r\n"
        "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\":"
    ).encode()
    assert raw_exchange(server, half_body).startswith(b"HTTP/1.1 408")
    assert time.monotonic() - started < 15  # --request-timeout 1, three times


def test_metrics_in_prometheus_format(server):
    post(server, GOOD)
    assert post(server, GOOD, headers={})[0] == 401
    with __import__("urllib.request").request.urlopen(server.url + "/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values['lora_arith_requests_total{outcome="length"}'] + values.get('lora_arith_requests_total{outcome="stop"}', 0) >= 1
    assert values["lora_arith_generation_tokens_total"] >= 1 and values["lora_arith_prompt_tokens_total"] >= 1
    assert values['lora_arith_requests_total{outcome="rejected_401"}'] >= 1
    assert values["lora_arith_time_to_first_token_seconds_count"] >= 1
    assert values["lora_arith_batch_size_count"] >= 1 and values['lora_arith_batch_size_bucket{le="2.0"}'] >= 1
    assert values["lora_arith_requests_running"] == 0 and values["lora_arith_requests_waiting"] == 0


@pytest.mark.browser
def test_the_playground_works_with_a_key(server):
    """The page is open; it asks for the key, and with it gets what the API gives."""
    from playground_driver import browser_available, open_browser, send
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    if not browser_available():
        pytest.skip("needs selenium and Debian's chromium + chromium-driver")
    driver = open_browser()
    try:
        driver.get(server.url + "/")
        key = driver.find_element(By.ID, "api-key")
        assert key.is_displayed()
        tokens = driver.find_element(By.ID, "max-tokens")
        tokens.clear()
        tokens.send_keys("6")
        assert send(driver, "hi")["a"] == "ERROR"  # no key yet: 401
        key.send_keys(KEY, Keys.TAB)
        shown = send(driver, "hi")["a"]
    finally:
        driver.quit()
    api = post(server, {**GOOD, "max_tokens": 6})[1]["choices"][0]["message"]["content"]
    assert shown == api and shown


def test_a_plain_request_whose_client_goes_away_leaves_the_batch(server):
    """Only streams were watched: a non-streamed request went on generating all its tokens for
    nobody after its client closed the connection (8 such requests held every row)."""
    whole = {**GOOD, "max_tokens": 480}
    uncut = post(server, whole)[1]["usage"]["completion_tokens"]
    assert uncut > 100  # what it generates when its client waits
    before = server.request("/health")[1]["generated_tokens"]
    body = json.dumps(whole).encode()
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s" % (KEY.encode(), len(body), body)
        )
        deadline = time.monotonic() + 30
        while server.request("/health")[1]["generated_tokens"] - before < 5 and time.monotonic() < deadline:
            time.sleep(0.005)  # it is generating (480 tokens take a few seconds here)
    deadline = time.monotonic() + 30
    while server.request("/health")[1]["running"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.request("/health")[1]["running"] == 0
    assert 5 <= server.request("/health")[1]["generated_tokens"] - before < uncut


def test_shutdown_answers_what_is_still_running_then_exits_0(server):
    """The module's last test: with --shutdown-timeout 0, SIGTERM fails the running rows at once:
    a JSON 503 for a plain request, an error event and [DONE] for a stream."""
    body = {**GOOD, "max_tokens": 480}
    results: dict[str, object] = {}
    plain = threading.Thread(target=lambda: results.__setitem__("plain", post(server, body)))
    plain.start()
    port = int(server.url.rsplit(":", 1)[1])
    stream = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    stream.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": True}), {**AUTH, "Content-Type": "application/json"})
    response = stream.getresponse()
    first = response.readline()
    assert first.startswith(b"data: ")
    deadline = time.monotonic() + 10
    while server.request("/health")[1]["running"] < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    server.process.send_signal(signal.SIGTERM)
    events = [line for line in response.read().decode().split("\n\n") if line.strip()]
    plain.join(30)
    status, reply, _ = results["plain"]
    assert status == 503 and reply["error"]["code"] == "shutting_down", reply
    assert events[-1] == "data: [DONE]" and "shutting_down" in events[-2], events[-3:]
    assert server.stop(signal.SIGTERM) == 0
    assert not any("Traceback" in line for line in server.lines), "".join(server.lines)


def test_a_second_ctrl_c_answers_what_runs_then_exits_0(chat_base, two_adapters):
    """uvicorn's second SIGINT cancelled every handler at once: plain-text 500s, streams cut
    without [DONE], a traceback each, and an exit long before --shutdown-timeout. The second
    Ctrl-C ends the grace period instead: JSON 503s, an error event and [DONE], exit 0."""
    server = Server(
        "--base", str(chat_base), "--adapter", f"helpful={two_adapters[0]}",
        "--max-tokens", "480", "--shutdown-timeout", "60",
    ).wait()  # fmt: skip
    try:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 480, "stop": ["\u0000never"]}
        port = int(server.url.rsplit(":", 1)[1])
        connections = []
        for stream in (False, True) * 3:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            connection.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": stream}),
                               {"Content-Type": "application/json"})  # fmt: skip
            connections.append((stream, connection))
        deadline = time.monotonic() + 20
        while server.request("/health")[1]["running"] < 6 and time.monotonic() < deadline:
            time.sleep(0.005)
        server.process.send_signal(signal.SIGINT)
        time.sleep(0.1)
        server.process.send_signal(signal.SIGINT)
        refused = 0
        for stream, connection in connections:
            response = connection.getresponse()
            text = response.read().decode()
            if stream:
                events = [event for event in text.split("\n\n") if event.strip()]
                assert events[-1] == "data: [DONE]", events[-2:]
                refused += "shutting_down" in events[-2]
            else:
                assert response.status in (200, 503), (response.status, text)
                refused += json.loads(text).get("error", {}).get("code") == "shutting_down"
        assert refused >= 1  # the second Ctrl-C came while rows ran
        assert server.process.wait(30) == 0
    finally:
        server.stop(signal.SIGKILL)
    assert not any("Traceback" in line for line in server.lines), "".join(server.lines)


def test_a_row_failing_on_its_own_mix_is_a_client_error():
    """A weight the server allows (a large --max-eta) that overflows the logits failed that row
    with 500 server_error; it is the request's doing: 400. A fault of the server stays 500."""
    from lora_arith._internal.errors import LoraArithError
    from lora_arith.serving.backends import _failure

    mix = _failure(LoraArithError("the model's logits are NaN or Inf: an adapter weight is too large"))
    assert (mix.status, mix.kind, mix.code) == (400, "invalid_request_error", "generation_failed")
    assert _failure(RuntimeError("CUDA error")).status == 500


def test_host_headers_are_read_strictly():
    """A malformed Host header ("[::1]evil.com", "localhost..") passed as loopback; an IPv4-mapped
    loopback address was refused."""
    from lora_arith.serving.app import _host_name, _is_loopback_host

    def loopback(header: str) -> bool:
        return _is_loopback_host(_host_name(header))

    assert all(map(loopback, ["localhost", "localhost.", "LOCALHOST:8000", "[::1]:80", "[::1]", "a.localhost",
                              "127.0.0.1:5", "[::ffff:127.0.0.1]:1"]))  # fmt: skip
    assert not any(map(loopback, ["[::1]evil.com", "localhost..", "[::1]:x", "evil.com", "127.0.0.1.evil.com"]))
