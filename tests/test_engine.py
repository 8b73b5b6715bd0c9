"""The continuous-batching engine behind ``serve``, in-process on the tiny chat model."""

from __future__ import annotations

import re
import threading
import time
import warnings

import pytest
import torch

from lora_arith._internal.errors import LoraArithError
from lora_arith.model.mixing import PreferenceMixer
from lora_arith.serving.engine import Engine, SlotCache
from lora_arith.serving.protocol import EngineClosed, EngineFull, RowRequest

PROMPTS = ["How do I bake bread?", "hi", "Tell me a joke about cats.", "What is the capital of France?"]
MIXES = [{"helpful": 1.0, "harmless": 1.0}, {"helpful": 0.5, "harmless": -1.0}, {"helpful": -1.0, "harmless": 0.2}]


@pytest.fixture(scope="module")
def mixer(chat_base, two_adapters):
    """The engine's mixer (an engine owns its mixer while it runs)."""
    helpful, harmless = two_adapters
    return PreferenceMixer(str(chat_base), {"helpful": helpful, "harmless": harmless})


@pytest.fixture(scope="module")
def reference(chat_base, two_adapters):
    """Another mixer of the same base and adapters, for the texts ``generate`` gives."""
    helpful, harmless = two_adapters
    return PreferenceMixer(str(chat_base), {"helpful": helpful, "harmless": harmless})


@pytest.fixture
def engine(mixer):
    engine = Engine(mixer, max_batch_size=4).start()
    yield engine
    engine.close(timeout=10)


def request(engine, prompt, weights, **options):
    return RowRequest(engine.encode([{"role": "user", "content": prompt}]), dict(weights), **options)


def test_rows_joining_and_leaving_get_what_generate_gives(reference, engine):
    """12 requests on 4 rows, with different lengths: rows join as others leave, each keeps its mix."""
    jobs = [(PROMPTS[i % 4], MIXES[i % 3], 3 + 2 * i) for i in range(12)]
    expected = [
        reference.generate([prompt], weights=[mix], max_new_tokens=length)[0] for prompt, mix, length in jobs
    ]
    results = engine.generate([request(engine, p, m, max_tokens=n) for p, m, n in jobs], timeout=120)
    assert [result.text for result in results] == expected
    assert max(engine.batch_sizes) == 4  # the batch was full
    assert len(set(engine.batch_sizes)) > 1  # and changed as rows left and joined


def test_unwritten_cache_memory_never_reaches_a_row(reference, mixer, monkeypatch):
    """The cache's buffers grow as rows join; a row attends to none of the columns it did not
    write (they are masked), but masked keys or values that are NaN still make its scores and
    output NaN (0 × NaN). Fresh memory may hold anything, so it is made NaN here: every row
    must still get the text ``generate`` gives."""
    empty = torch.Tensor.new_empty
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: empty(self, *a, **k).fill_(float("nan")))
    engine = Engine(mixer, max_batch_size=4).start()
    long_job = (PROMPTS[3] + " Answer in one long sentence, please.", MIXES[0], 40)
    jobs = [(PROMPTS[i % 3], MIXES[i % 3], 3 + 2 * i) for i in range(6)]  # shorter prompts
    try:
        first: list = []
        engine.submit(request(engine, long_job[0], long_job[1], max_tokens=long_job[2]), first.append, first.append)
        deadline = time.monotonic() + 60
        while engine.steps < 2 and time.monotonic() < deadline:  # the first row is decoding alone
            time.sleep(0.01)
        results = engine.generate([request(engine, p, m, max_tokens=n) for p, m, n in jobs], timeout=120)
        while not first and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        engine.close(timeout=10)
    monkeypatch.undo()
    expected = [reference.generate([p], weights=[m], max_new_tokens=n)[0] for p, m, n in [long_job, *jobs]]
    assert [result.text for result in first + results] == expected


def test_a_row_that_fails_fails_alone(reference, engine, monkeypatch):
    """A temperature far below the protocol's floor overflows the softmax: that row fails, the
    rows batched with it finish with the text they get alone (such a request is refused by
    Engine.check now; the worker's own isolation is tested past it)."""
    good = [request(engine, PROMPTS[i], MIXES[i % 3], max_tokens=8) for i in range(3)]
    bad = request(engine, PROMPTS[0], MIXES[0], max_tokens=8, temperature=1e-300, seed=2**64 - 1)
    with pytest.raises(LoraArithError, match="temperature must be 0"):
        engine.check(bad)
    monkeypatch.setattr(engine, "check", lambda request: None)
    outcomes: dict[int, object] = {}
    done = threading.Semaphore(0)
    for index, row in enumerate([good[0], bad, good[1], good[2]]):
        report = lambda value, index=index: (outcomes.__setitem__(index, value), done.release())  # noqa: E731
        engine.submit(row, report, report)
    for _ in range(4):
        assert done.acquire(timeout=60)
    assert isinstance(outcomes[1], Exception) and "sampling failed" in str(outcomes[1])
    expected = [reference.generate([PROMPTS[i]], weights=[MIXES[i % 3]], max_new_tokens=8)[0] for i in range(3)]
    assert [outcomes[i].text for i in (0, 2, 3)] == expected
    assert engine.generate([request(engine, PROMPTS[1], MIXES[0], max_tokens=4)], timeout=30)  # still serving


def test_short_requests_do_not_wait_for_a_long_one(engine):
    """Head-of-line blocking: 8-token requests sent while a 200-token request runs finish within
    a few steps of their own length, long before the long one ends."""
    long_done = threading.Event()
    long = request(engine, PROMPTS[1], MIXES[0], max_tokens=200)
    long.stop = ["\x00never"]  # no early end from a stop string
    engine.submit(long, lambda result: long_done.set(), lambda error: long_done.set())
    while engine.steps < 5:
        time.sleep(0.001)
    started = engine.steps
    short = [request(engine, PROMPTS[2], MIXES[1], max_tokens=8) for _ in range(3)]
    results = engine.generate(short, timeout=60)
    finished = engine.steps
    assert all(result.completion_tokens <= 8 for result in results)
    assert finished - started <= 8 + 3, (started, finished)
    assert not long_done.is_set() or long.cancelled.is_set()
    long.cancelled.set()
    assert long_done.wait(30)


def test_the_queue_is_bounded_and_close_fails_what_is_left(mixer):
    engine = Engine(mixer, max_batch_size=2, max_queue=3)  # not started: nothing leaves the queue
    errors: list[BaseException] = []
    for _ in range(2 + 3):  # two for the free rows, three waiting
        engine.submit(request(engine, "hi", {}, max_tokens=4), print, errors.append)
    with pytest.raises(EngineFull, match="3 requests are already waiting"):
        engine.submit(request(engine, "hi", {}, max_tokens=4), print, errors.append)
    engine.start().close(timeout=0)
    assert len(errors) == 5 and all(isinstance(error, EngineClosed) for error in errors)
    # --max-queue 0: nothing waits, but a free row is taken (it answered 429 to every request)
    alone = Engine(mixer, max_batch_size=1, max_queue=0).start()
    try:
        ids = engine.encode([{"role": "user", "content": "hi"}])
        assert alone.generate([RowRequest(ids, max_tokens=2)], timeout=30)[0].completion_tokens >= 1
    finally:
        alone.close(timeout=10)
    with pytest.raises(EngineClosed):
        engine.submit(request(engine, "hi", {}, max_tokens=4), print, print)


def test_slot_cache_keeps_each_rows_keys_through_joins_shifts_and_departures():
    """Rows right-aligned on one time axis: a longer prompt shifts the others; a departure moves
    the last row into the hole; trimming drops columns nobody uses."""

    class Prefill:  # a transformers cache's layers, as the engine hands them over
        def __init__(self, keys):
            self.layers = [type("L", (), {"keys": keys, "values": -keys})()]

    cache = SlotCache(max_rows=4)
    a = torch.arange(1, 4, dtype=torch.float32).view(1, 1, 3, 1)  # a row with 3 columns
    cache.insert(Prefill(a), torch.ones(1, 3, dtype=torch.long))
    b = torch.arange(10, 15, dtype=torch.float32).view(1, 1, 5, 1)  # longer: the axis shifts right by 2
    cache.insert(Prefill(b), torch.ones(1, 5, dtype=torch.long))
    keys = cache.layers[0]._keys
    assert cache.length == 5 and cache.rows == 2 and keys.shape[0] == 2  # the buffers grow with the batch
    assert keys[0, 0, 2:5, 0].tolist() == [1, 2, 3] and cache.mask[0, :5].tolist() == [0, 0, 1, 1, 1]
    assert keys[1, 0, :5, 0].tolist() == [10, 11, 12, 13, 14]
    c = torch.full((1, 1, 2, 1), 7.0)
    cache.insert(Prefill(c), torch.ones(1, 2, dtype=torch.long))
    assert cache.mask[2, :5].tolist() == [0, 0, 0, 1, 1]
    keys = cache.layers[0]._keys  # grown to 4 rows
    assert keys.shape[0] == 4
    assert cache.remove([0]) == [2, 1]  # the last row fills the hole
    assert cache.rows == 2 and cache.layers[0].keys.shape[0] == 2
    assert cache.mask[0, :5].tolist() == [0, 0, 0, 1, 1] and keys[0, 0, 3:5, 0].tolist() == [7, 7]
    assert cache.layers[0]._values[0, 0, 3:5, 0].tolist() == [-7, -7]
    cache.trim(least=1)  # no row uses column 0 any more... but row 1 (b) does: nothing to trim
    assert cache.length == 5
    cache.remove([1])
    cache.trim(least=1)  # only c is left: its 3 leading masked columns go
    assert cache.length == 2 and cache.layers[0].keys[0, 0, :, 0].tolist() == [7, 7]
    assert cache.step_mask() is None  # every column of every row is used


def test_int8_base_quantizes_the_base_layers_only_and_serves(chat_base, two_adapters, reference):
    from torch.ao.nn.quantized.dynamic import Linear as Int8Linear

    helpful, harmless = two_adapters
    mixer = PreferenceMixer(str(chat_base), {"helpful": helpful, "harmless": harmless})
    linear = [name for name, module in mixer.model.named_modules() if type(module) is torch.nn.Linear]
    with warnings.catch_warnings(record=True) as caught:  # torch.ao's deprecation notices are not the user's
        warnings.simplefilter("always")
        count = mixer.quantize_int8()
    assert not caught, [str(w.message) for w in caught]
    assert count == len([name for name in linear if "lora_" not in name]) > 0
    modules = dict(mixer.model.named_modules())
    assert all(isinstance(modules[name], Int8Linear) for name in linear if "lora_" not in name)
    assert all(type(modules[name]) is torch.nn.Linear for name in linear if "lora_" in name)  # adapters stay fp32
    engine = Engine(mixer, max_batch_size=4).start()
    try:
        results = engine.generate([request(engine, p, MIXES[i % 3], max_tokens=6) for i, p in enumerate(PROMPTS)], timeout=60)
    finally:
        engine.close(timeout=10)
    assert all(result.completion_tokens > 0 for result in results)
    with pytest.raises(Exception, match="already quantized"):
        mixer.quantize_int8()


def test_serve_refuses_int8_with_4bit():
    from click.testing import CliRunner

    from lora_arith.cli import main

    result = CliRunner().invoke(main, ["serve", "--int8", "--4bit"])
    assert result.exit_code != 0 and "choose one" in result.output and "Traceback" not in result.output


def test_a_shared_prefix_gives_the_texts_of_a_full_prefill(mixer, reference):
    """The prefix every prompt starts with, run once per mix and kept, gives the texts of
    prefilling every prompt whole (tested with a system turn as the prefix: the tiny template
    has none of its own)."""
    system = {"role": "system", "content": "You are a helpful assistant named Tiny, made for tests."}
    engine = Engine(mixer, max_batch_size=6, share_prefix=False)
    conversations = [[system, {"role": "user", "content": prompt}] for prompt in PROMPTS]
    prompts = [engine.encode(conversation) for conversation in conversations]
    shared = 0
    while all(len(ids) > shared + 1 and ids[shared] == prompts[0][shared] for ids in prompts):
        shared += 1
    assert shared > 5  # the system turn
    engine.prefix_ids = prompts[0][:shared]
    jobs = [(ids, MIXES[i % 2]) for i, ids in enumerate(prompts * 2)]
    engine.start()
    try:
        got = engine.generate([RowRequest(list(ids), dict(mix), max_tokens=8) for ids, mix in jobs], timeout=60)
    finally:
        engine.close(timeout=10)
    assert len(engine._prefixes) == 2  # one prefix per mix, run once
    expected = [reference.generate([conversations[i % 4]], weights=[MIXES[i % 2]], max_new_tokens=8)[0] for i in range(8)]
    assert [result.text for result in got] == expected


def test_a_long_prompt_does_not_make_the_batch_outgrow_its_token_budget(mixer, reference):
    """All rows share one time axis, so a long prompt makes every row as long: with a budget of
    rows × columns that fits it alone, the short requests wait for it instead of joining."""
    long_prompt = "bread " * 40
    probe = Engine(mixer)
    length = len(probe.encode([{"role": "user", "content": long_prompt}]))
    engine = Engine(mixer, max_batch_size=4, max_batch_tokens=length + 12).start()
    try:
        jobs = [(long_prompt, MIXES[0], 10)] + [(PROMPTS[i], MIXES[i % 3], 4) for i in range(3)]
        results = engine.generate([request(engine, p, m, max_tokens=n) for p, m, n in jobs], timeout=60)
        sizes = list(engine.batch_sizes)
    finally:
        engine.close(timeout=10)
    assert sizes[: results[0].completion_tokens - 1] == [1] * (results[0].completion_tokens - 1)
    assert max(sizes) > 1  # the short ones batched together after it
    expected = [reference.generate([p], weights=[m], max_new_tokens=n)[0] for p, m, n in jobs]
    assert [result.text for result in results] == expected


def test_the_token_budget_counts_each_row_at_its_longest(mixer, reference):
    """Admission counted prompts only, so rows of short prompts and long replies grew the cache
    far past --max-batch-tokens (8 rows of ~404 columns against a budget of 300): each row counts
    with all of its max_tokens now, and the cache's buffers stop growing at the longest row's end."""
    length = len(Engine(mixer).encode([{"role": "user", "content": PROMPTS[1]}]))
    budget = 2 * (length + 40)  # two rows at their longest
    engine = Engine(mixer, max_batch_size=4, max_batch_tokens=budget)
    done = threading.Semaphore(0)
    results: list = [None] * 4
    for index in range(4):  # all queued before the worker starts: they join together, two by two
        report = lambda value, index=index: (results.__setitem__(index, value), done.release())  # noqa: E731
        engine.submit(request(engine, PROMPTS[1], MIXES[index % 3], max_tokens=40, stop=["\x00never"]), report, report)
    engine.start()
    try:
        assert all(done.acquire(timeout=60) for _ in range(4))
        sizes = list(engine.batch_sizes)
        capacity = engine._cache.mask.shape[1]
    finally:
        engine.close(timeout=10)
    assert max(sizes) == 2 and capacity <= length + 40 + 1
    expected = [reference.generate([PROMPTS[1]], weights=[MIXES[i % 3]], max_new_tokens=40)[0] for i in range(4)]
    assert [result.text for result in results] == expected


def test_a_row_joining_a_longer_axis_does_not_regrow_the_cache_every_step(mixer, monkeypatch):
    """A row that joins an axis longer than its prompt ends at that axis plus its max_tokens: the
    limit the cache's growth stopped at was its prompt plus max_tokens, so past it the buffers
    of every layer were copied once per step (22 times here), one column at a time."""
    grown: list[int] = []
    reserve = SlotCache.reserve

    def counted(self, rows, columns):
        before = self.mask.shape[1]
        reserve(self, rows, columns)
        if self.mask.shape[1] != before:
            grown.append(self.mask.shape[1])

    monkeypatch.setattr(SlotCache, "reserve", counted)
    engine = Engine(mixer, max_batch_size=4).start()
    try:
        ids = engine.encode([{"role": "user", "content": "word " * 22}])
        first: list = []
        engine.submit(RowRequest(ids, max_tokens=40, stop=["\x00never"]), first.append, first.append)
        deadline = time.monotonic() + 30
        while engine.generated_tokens < 20 and time.monotonic() < deadline:
            time.sleep(0.001)
        engine.generate([RowRequest(ids, max_tokens=40, stop=["\x00never"])], timeout=60)
    finally:
        engine.close(timeout=10)
    assert len(grown) <= 4 and grown[-1] <= len(ids) + 2 * 40, grown


def test_the_context_length_is_decided_in_one_place_with_one_fallback(mixer, monkeypatch):
    """The model's config, else its tokenizer, else 2048: for the engine (and so the server's
    settings) and for the check of ``generate``'s and ``sweep``'s prompts alike."""
    from types import SimpleNamespace

    from lora_arith._internal.errors import LoraArithError
    from lora_arith.model.generation import DEFAULT_CONTEXT_LENGTH, check_prompt_lengths, context_length

    stated = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=512))
    assert context_length(stated, SimpleNamespace(model_max_length=100)) == 512
    unstated = SimpleNamespace(config=SimpleNamespace())
    assert context_length(unstated, SimpleNamespace(model_max_length=300)) == 300
    assert context_length(unstated, SimpleNamespace(model_max_length=int(1e30))) == DEFAULT_CONTEXT_LENGTH == 2048
    assert Engine(mixer).context_length == context_length(mixer.model, mixer.tokenizer) == 512
    monkeypatch.delattr(mixer.model.config, "max_position_embeddings")
    monkeypatch.setattr(mixer.tokenizer, "model_max_length", int(1e30))
    assert Engine(mixer).context_length == DEFAULT_CONTEXT_LENGTH
    with pytest.raises(LoraArithError, match="context of 2048 tokens"):
        check_prompt_lengths(mixer.model, mixer.tokenizer, ["hi"], max_new_tokens=2048)


def test_a_library_callers_malformed_request_is_refused_at_submit(engine, mixer):
    """From Python, a RowRequest with text for token ids killed the worker thread (every later
    request then failed or waited for ever); others ran wrong (max_tokens=0 gave a token). Each
    is refused at submit, naming its field, and the engine goes on serving."""
    ids = engine.encode([{"role": "user", "content": "hi"}])
    bad = [
        (RowRequest("hello", max_tokens=3), "prompt_ids must be a non-empty list of token ids"),
        (RowRequest([], max_tokens=3), "prompt_ids must be"),
        (RowRequest([10**9], max_tokens=3), "prompt_ids must be"),
        (RowRequest(ids, max_tokens=0), "max_tokens must be a whole number of at least 1"),
        (RowRequest(ids, max_tokens=10**9), "exceed the model's context"),
        (RowRequest(ids, {"nope": 1.0}), "no adapter named nope"),
        (RowRequest(ids, temperature=-1.0), "temperature must be 0"),
        (RowRequest(ids, temperature=0.7, top_p=0.0), "top_p must be above 0"),
        (RowRequest(ids, temperature=0.7, seed=2**64), "seed must be a whole number within int64"),
        (RowRequest(ids, stop="x"), "stop must be a list of strings"),
    ]
    for row, message in bad:
        with pytest.raises(LoraArithError, match=message):
            engine.submit(row, print, print)
    with pytest.raises(TypeError, match="RowRequest objects, not str"):
        engine.generate(["hello"])
    assert engine.generate([RowRequest(ids, max_tokens=2)], timeout=30)[0].completion_tokens >= 1
    assert re.fullmatch(r"Engine\(running, rows=[01]/4, queued=0, steps=\d+, tokens=\d+\)", repr(engine)), repr(engine)

    waiting = Engine(mixer)
    with pytest.raises(LoraArithError, match="call its start"):  # it waited for ever
        waiting.generate([RowRequest(ids, max_tokens=2)])
    for option, value in (("max_batch_size", "4"), ("max_batch_tokens", 0), ("max_prefill_tokens", -1),
                          ("max_queue", -1)):  # fmt: skip
        with pytest.raises(LoraArithError, match=f"{option} must be a whole number"):
            Engine(mixer, **{option: value})


def test_a_running_engine_holds_its_mixer(mixer):
    """While an engine ran, the mixer's own generate gave the engine's per-row mixes or a raw
    torch shape error; a second engine on the same mixer mixed both batches' weights."""
    engine = Engine(mixer).start()
    try:
        with pytest.raises(LoraArithError, match="a running Engine holds this mixer"):
            mixer.generate(["hi"], max_new_tokens=1)
        with pytest.raises(LoraArithError, match="a running Engine holds this mixer"):
            Engine(mixer).start()
        ids = engine.encode([{"role": "user", "content": "hi"}])
        assert engine.generate([RowRequest(ids, max_tokens=2)], timeout=30)
    finally:
        engine.close(timeout=10)
    assert mixer.generate(["hi"], max_new_tokens=1)  # closed: the mixer is the caller's again
