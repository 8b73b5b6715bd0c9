"""``lora-arith serve`` against the official openai client, on a live server on 127.0.0.1.

Only the tests that talk through the client need the ``openai`` package (the ``openai`` and
``client`` fixtures skip them without it); the others speak plain HTTP and run anyway."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lora_arith.lora.combine import combine
from lora_arith.lora.specs import parse_specs
from lora_arith.model.mixing import PreferenceMixer
from serving_helpers import Server

REPO = Path(__file__).resolve().parent.parent
MIXES = [
    {"helpful": 1.0, "harmless": 1.0},
    {"helpful": 0.5, "harmless": -1.0},
    {"helpful": -1.0},  # harmless takes the server's default
    {},
]
DEFAULTS = {"helpful": 0.25, "harmless": 0.75}
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def started(chat_base, two_adapters):
    """The server process, started (it loads while the ``expected`` fixture computes)."""
    helpful, harmless = two_adapters
    server = Server(
        "--base",
        str(chat_base),
        "--adapter",
        f"helpful={helpful}",
        "--adapter",
        f"harmless={harmless}:0.75",
        "--weights",
        "helpful=0.25",
        "--max-batch-size",
        "8",
        "--max-tokens",
        "64",
    )
    yield server
    server.stop(signal.SIGKILL)


@pytest.fixture
def server(started, expected):
    return started.wait()


@pytest.fixture
def client(server, openai):
    """An openai client of the module's server (skipped without the ``openai`` package)."""
    return server.client()


def chat(client, prompt, preferences=None, **options):
    extra = {"extra_body": {"preferences": preferences}} if preferences is not None else {}
    return client.chat.completions.create(
        model="lora-arith",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=options.pop("max_tokens", MAX_TOKENS),
        **extra,
        **options,
    )


@pytest.fixture(scope="module")
def expected(started, chat_base, two_adapters, tmp_path_factory):
    """mix index → prompt → what ``generate`` gives with the adapter ``combine`` writes for that mix."""
    helpful, harmless = two_adapters
    folder = tmp_path_factory.mktemp("combined")
    table = {}
    for index, mix in enumerate(MIXES):
        weights = {**DEFAULTS, **mix}
        combined = combine(parse_specs([f"{helpful}:{weights['helpful']}", f"{harmless}:{weights['harmless']}"]))
        mixer = PreferenceMixer(str(chat_base), {"mix": combined.save(folder / f"mix{index}")})
        table[index] = dict(zip(PROMPTS, mixer.generate(PROMPTS, max_new_tokens=MAX_TOKENS)))
    return table


PROMPTS = ["How do I bake bread?", "hi", "Tell me a joke about cats.", "What is the capital of France?"]


def test_preferences_give_the_combined_adapters_text(server, client, expected):
    for index, mix in enumerate(MIXES):
        reply = chat(client, PROMPTS[0], mix)
        assert reply.choices[0].message.content == expected[index][PROMPTS[0]]
        assert reply.choices[0].finish_reason in ("stop", "length")
        usage = reply.usage
        assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= MAX_TOKENS
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert len({expected[i][PROMPTS[0]] for i in range(len(MIXES))}) == len(MIXES)  # the mixes really differ
    assert chat(client, PROMPTS[0]).choices[0].message.content == expected[3][PROMPTS[0]]  # no preferences
    assert [model.id for model in client.models.list().data] == ["lora-arith"]
    with urllib.request.urlopen(server.url + "/health", timeout=10) as response:
        assert json.loads(response.read())["preferences"] == DEFAULTS


def test_16_concurrent_clients_get_their_own_mix(server, client, expected):
    jobs = [(i % len(MIXES), PROMPTS[(i // len(MIXES)) % len(PROMPTS)]) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda job: chat(client, job[1], MIXES[job[0]]), jobs))
    for (index, prompt), reply in zip(jobs, replies):
        assert reply.choices[0].message.content == expected[index][prompt], (index, prompt)
    assert max(health(server)["batch_sizes"]) > 1  # they were batched together


def test_stream_reassembles_to_the_reply(client):
    for mix in MIXES[:2]:
        whole = chat(client, PROMPTS[2], mix, max_tokens=24).choices[0].message.content
        stream = chat(client, PROMPTS[2], mix, max_tokens=24, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
        assert "".join(pieces) == whole
        if "\ufffd" not in whole:  # a reply of undecodable bytes is held back to its end, then sent whole
            assert len([p for p in pieces if p]) > 1
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
        assert chunks[-1].usage.completion_tokens > 0
    # sampling with a seed is reproducible, streamed or not; stop strings cut the reply
    sampled = chat(client, PROMPTS[1], MIXES[1], temperature=1.0, top_p=0.9, seed=7, max_tokens=24)
    text = sampled.choices[0].message.content
    streamed = chat(client, PROMPTS[1], MIXES[1], temperature=1.0, top_p=0.9, seed=7, max_tokens=24, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    if stop.strip():
        cut = chat(client, PROMPTS[1], MIXES[1], temperature=1.0, top_p=0.9, seed=7, max_tokens=24, stop=[stop])
        assert cut.choices[0].message.content == text[: text.index(stop)].strip()
        assert cut.choices[0].finish_reason == "stop"


BAD_REQUESTS = [
    ({"preferences": {"nope": 1.0}}, 400, "unknown preference 'nope'"),
    ({"preferences": {"helpful": "NaN"}}, 400, "finite number"),
    ({"preferences": {"helpful": 1e999}}, 400, "finite number"),  # json.dumps writes Infinity
    ({"preferences": {"helpful": 4.5}}, 400, "limit of 4"),
    ({"preferences": {"harmless": -5}}, 400, "limit of 4"),
    ({"messages": []}, 400, "non-empty list"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role must be one of"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"max_tokens": 65}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "bread " * 600}]}, 400, "context"),
    ({"n": 2}, 400, "n=1"),
]


def test_bad_requests_get_errors_and_good_ones_alongside_succeed(server, expected):
    good = {"model": "lora-arith", "messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": MAX_TOKENS}
    bodies = [json.dumps({**good, **change}).encode() for change, _, _ in BAD_REQUESTS]
    bodies.append(b'{"model": "lora-arith", "messages": [')  # malformed JSON
    with ThreadPoolExecutor(8) as pool:
        goods = [pool.submit(server.post, {**good, "preferences": MIXES[i % 4]}) for i in range(4)]
        bads = list(pool.map(server.post, bodies))
        goods = [future.result() for future in goods]
    for (change, status, message), (got_status, body) in zip(BAD_REQUESTS + [({}, 400, "not valid JSON")], bads):
        assert got_status == status, (change, body)
        assert body["error"]["type"] == "invalid_request_error" and message in body["error"]["message"], body
    for i, (status, body) in enumerate(goods):
        assert status == 200 and body["choices"][0]["message"]["content"] == expected[i % 4][PROMPTS[1]]


def test_the_client_raises_the_servers_errors(client, openai):
    with pytest.raises(openai.BadRequestError, match="unknown preference"):
        chat(client, "hi", {"nope": 1})


def health(server) -> dict:
    with urllib.request.urlopen(server.url + "/health", timeout=10) as response:
        return json.loads(response.read())


def test_a_large_body_does_not_freeze_the_server(server):
    """A 3.6 MB prompt (under the 4 MiB limit) is parsed and refused off the event loop, and
    without tokenizing it: /health answers at once meanwhile."""
    body = json.dumps({"model": "lora-arith", "messages": [{"role": "user", "content": "bread " * 600_000}]}).encode()
    assert 3 * 2**20 < len(body) < 4 * 2**20
    result: dict = {}
    sender = threading.Thread(target=lambda: result.update(reply=server.post(body)))
    sender.start()
    slowest = 0.0
    for _ in range(200):  # at most 200 probes, while the request runs
        started = time.monotonic()
        health(server)
        slowest = max(slowest, time.monotonic() - started)
        if not sender.is_alive():
            break
    sender.join(60)
    status, reply = result["reply"]
    assert status == 400 and "context" in reply["error"]["message"], reply
    assert slowest < 1.0, slowest


@pytest.mark.browser
def test_playground_in_a_headless_browser(server, client, tmp_path):
    """Move sliders, send a prompt, compare: the page shows what the API gives for those weights."""
    from playground_driver import browser_available, move_slider, open_browser, screenshot, send, sliders
    from selenium.webdriver.common.by import By

    if not browser_available():
        pytest.skip("needs selenium and Debian's chromium + chromium-driver")
    driver = open_browser()
    try:
        driver.get(server.url + "/")
        assert sliders(driver, "a").keys() == DEFAULTS.keys()
        assert driver.find_element(By.ID, "eta-a-helpful").get_attribute("min") == "-4"
        max_tokens = driver.find_element(By.ID, "max-tokens")
        max_tokens.clear()
        max_tokens.send_keys(str(MAX_TOKENS))
        assert move_slider(driver, "a", "helpful", -12) == pytest.approx(sliders(driver, "a")["helpful"])
        weights = sliders(driver, "a")
        assert weights["helpful"] < 0
        shown = send(driver, PROMPTS[0])["a"]
        api = chat(client, PROMPTS[0], weights).choices[0].message.content
        assert shown == api and shown
        driver.find_element(By.ID, "compare").click()
        move_slider(driver, "b", "harmless", 15)
        both = send(driver, PROMPTS[1], ("a", "b"))
        for side in ("a", "b"):
            history = [{"role": "user", "content": PROMPTS[1]}] if side == "b" else None
            if history is None:  # side a continues its conversation
                history = [
                    {"role": "user", "content": PROMPTS[0]},
                    {"role": "assistant", "content": shown},
                    {"role": "user", "content": PROMPTS[1]},
                ]
            reply = client.chat.completions.create(
                model="lora-arith",
                messages=history,
                max_tokens=MAX_TOKENS,
                extra_body={"preferences": sliders(driver, side)},
            )
            assert both[side] == reply.choices[0].message.content
        screenshot(driver, Path(os.environ.get("LORA_ARITH_SCREENSHOT", tmp_path / "playground.png")))
    finally:
        driver.quit()


def test_disconnected_stream_frees_its_slot_then_sigterm_exits_0(server, client):
    """The last test on the module's server: it stops it."""
    whole = chat(client, "hi", max_tokens=64)
    assert whole.usage.completion_tokens == 64  # uncut, this request runs to its limit
    before = health(server)["generated_tokens"]
    stream = chat(client, "hi", max_tokens=64, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break  # the row is generating
    stream.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 30
    while health(server)["running"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert health(server)["running"] == 0
    assert 0 < health(server)["generated_tokens"] - before < 64  # the row stopped early
    # SIGTERM while a request streams: it finishes, then the server exits 0
    chunks = iter(chat(client, "How do I bake bread?", max_tokens=48, stream=True))
    first = next(chunks)
    server.process.send_signal(signal.SIGTERM)
    rest = list(chunks)
    assert first.choices[0].delta.role == "assistant"
    assert rest[-1].choices[0].finish_reason in ("stop", "length")
    assert server.stop(signal.SIGTERM) == 0, "".join(server.lines)


@pytest.mark.base
@pytest.mark.usefixtures("openai")
def test_serve_on_the_default_base_with_the_shipped_vectors(tmp_path):
    helpful, harmless = REPO / "adapters" / "helpful", REPO / "adapters" / "harmless"
    server = Server("--adapter", f"helpful={helpful}", "--adapter", f"harmless={harmless}", "--max-tokens", "8")
    try:
        mixes = [{"helpful": 1.0, "harmless": 1.0}, {"helpful": 1.0, "harmless": -1.0}]
        prompt = "hi"  # the shipped vectors answer it differently at these two mixes
        combined = {
            f"mix{i}": combine(parse_specs([f"{helpful}:{mix['helpful']}", f"{harmless}:{mix['harmless']}"])).save(
                tmp_path / f"m{i}"
            )
            for i, mix in enumerate(mixes)
        }
        mixer = PreferenceMixer(None, combined, device="cpu")  # one combined adapter on at a time
        expected = []
        for index in range(len(mixes)):
            mixer.set(**{name: float(name == f"mix{index}") for name in combined})
            expected.append(mixer.generate([prompt], max_new_tokens=8)[0])
        assert expected[0] != expected[1]
        client = server.wait().client()
        with ThreadPoolExecutor(2) as pool:
            replies = list(pool.map(lambda i: chat(client, prompt, mixes[i], max_tokens=8), range(2)))
        assert [r.choices[0].message.content for r in replies] == expected
        streamed = chat(client, prompt, mixes[1], max_tokens=8, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected[1]
        assert server.stop(signal.SIGTERM) == 0
    finally:
        server.stop(signal.SIGKILL)
