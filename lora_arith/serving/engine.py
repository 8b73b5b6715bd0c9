"""Continuous (iteration-level) batching with a mix of preference vectors per row.

One worker thread runs one decoding loop. Requests join the running batch at step boundaries
and leave it the moment they finish; each row carries its own weights η, sampling (temperature,
top_p, seed), ``max_tokens`` and stop strings. The fast path is the one ``sweep`` uses: fused
per-row LoRA inside the GEMM (:meth:`PreferenceMixer.row_handle` with ``fused=True``) and a KV
cache written in place (:class:`SlotCache`).

**How prefill interleaves with decoding.** At each step boundary the loop first prefills the
requests that have arrived (as many as there are free rows, and at most ``max_prefill_tokens``
prompt tokens in one go), then runs one decoding step for the whole batch, new rows included.
Prefill first, as vLLM's scheduler does without chunked prefill, because on the chat prompts
this server sees (tens to a few hundred tokens) one prefill costs about as much as a few decoding
steps of the batch: a new request starts at once, and the rows already running wait one short
prefill. The token budget bounds that wait when a burst of long prompts arrives; the requests
beyond it join at the next boundaries. A prefill is a separate forward (its own small cache)
whose keys and values are then copied into free rows of the batch's cache, right-aligned on
the batch's time axis, so the decoding step stays one ``(rows, 1)`` forward.

**Isolation.** Requests are validated before they are submitted (see ``serving.protocol``).
Whatever still fails in a row (non-finite logits, a sampling error, a callback that raises)
fails that row alone; only an error of the forward pass itself fails the rows in it.
"""

from __future__ import annotations

import collections
import functools
import secrets
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from lora_arith._internal.errors import LoraArithError, OptionError
from lora_arith.lora.numerics import finite_number, require_count
from lora_arith.serving.protocol import EngineClosed, EngineFull, RowRequest, RowResult

if TYPE_CHECKING:
    from lora_arith.model.mixing import PreferenceMixer, RowWeights

__all__ = [
    "Engine",
    "SlotCache",
    "cut_at_stop",
    "greedy_completions",
]


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
    """A request in the engine: its tokens, its text, what was streamed, and how to report back."""

    def __init__(self, request: RowRequest, engine: "Engine", on_done, on_error) -> None:
        self.request, self.engine = request, engine
        self.on_done, self.on_error = on_done, on_error
        self.tokens: list[int] = []
        self.generated = 0
        self.done: str | None = None
        self.sent = ""
        self.submitted = time.monotonic()
        self.generator: torch.Generator | None = None
        if request.temperature > 0:
            seed = request.seed if request.seed is not None else secrets.randbits(63)
            self.generator = torch.Generator().manual_seed(seed % 2**64)

    def text(self) -> str:
        raw = self.engine.tokenizer.decode(self.tokens, skip_special_tokens=True)
        return cut_at_stop(raw, self.request.stop)[0].strip()

    def add(self, token: int) -> None:
        """Take the next token; sets :attr:`done` when the row ends."""
        if self.generated == 0:
            self.engine._observe("first_token", time.monotonic() - self.submitted)
        self.generated += 1
        if token in self.engine.stop_ids:
            self.done = "stop"
            return
        self.tokens.append(token)
        stops = self.request.stop
        if not stops and self.request.on_text is None:
            if self.generated >= self.request.max_tokens:
                self.done = "length"
            return
        raw = self.engine.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut, stopped = cut_at_stop(raw, stops)
        if stopped:
            self.done = "stop"
        elif self.generated >= self.request.max_tokens:
            self.done = "length"
        elif self.request.on_text is not None:  # stream what can no longer change
            safe = cut[: len(cut) - _held_back(cut, stops)].strip()
            self._send(safe.rstrip("\ufffd"))  # an incomplete UTF-8 character waits

    def _send(self, text: str) -> None:
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.request.on_text(text[len(self.sent) :])
            self.sent = text

    def finish(self) -> None:
        text = self.text()
        if self.request.on_text is not None:
            self._send(text)
        prompt = len(self.request.prompt_ids)
        result = RowResult(text, self.done or "length", prompt, self.generated)
        self.engine._observe("finished", result, time.monotonic() - self.submitted)
        try:
            self.on_done(result)
        except Exception:  # noqa: BLE001 - a broken callback must not stop the engine
            pass

    def fail(self, error: BaseException) -> None:
        self.done = "error"
        self.engine._observe("failed", error)
        try:
            self.on_error(error)
        except Exception:  # noqa: BLE001 - a broken callback must not stop the engine
            pass


@functools.cache
def _slot_layer_class() -> type:
    """The cache layer of :class:`SlotCache` (made on first use: transformers loads lazily)."""
    from transformers.cache_utils import DynamicLayer

    class SlotLayer(DynamicLayer):
        """One attention layer's keys and values in buffers of reserved rows and columns; a
        decoding step writes its column in place and the model sees views of the used part."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
            super().__init__()
            self._keys, self._values = keys, values
            self.rows, self.length = 0, 0
            self.device, self.dtype = keys.device, keys.dtype
            self.is_initialized = True
            self._views()

        def _views(self) -> None:
            self.keys = self._keys[: self.rows, :, : self.length]
            self.values = self._values[: self.rows, :, : self.length]

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            pass  # made with its buffers

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
            start, stop = self.length, self.length + key_states.shape[-2]
            self._keys[: self.rows, :, start:stop] = key_states
            self._values[: self.rows, :, start:stop] = value_states
            self.length = stop
            self._views()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def get_max_length(self) -> int:
            return -1

        def crop(self, tokens_to_remove: int) -> None:
            raise NotImplementedError("a slot cache is not cropped")

        def reset(self) -> None:
            raise NotImplementedError("a slot cache is not reset")

    return SlotLayer


class SlotCache:
    """The KV cache of a batch that rows join and leave: per layer, buffers of
    ``(max_rows, heads, capacity, head_dim)``, row ``i`` of the batch in slot ``i``, every row on
    one time axis of :attr:`length` columns, right-aligned (a row's columns end at the last one);
    :attr:`mask` marks the columns each row attends to.

    * :meth:`insert` copies a prefill's cache into the next free slots (shifting the time axis
      right when the new prompt is longer than it);
    * :meth:`remove` fills the slots of leaving rows with the last rows (copying only those);
    * :meth:`trim` drops leading columns no row uses any more;
    * a decoding step writes one column for every row in place (no concatenation).
    """

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self.cache = None
        self.layers: list = []
        self.rows = 0
        self.length = 0
        self.mask = torch.zeros((0, 0), dtype=torch.long)
        self.column_limit: int | None = None
        """The longest the time axis can get (the engine's rows' ends): growth stops there."""

    def reserve(self, rows: int, columns: int) -> None:
        """Make room for ``rows`` rows of ``columns`` columns, doubling what is short (so that growth
        is amortised); buffers grow with the batch, not to ``max_rows`` at once."""
        slots, capacity = self.mask.shape
        if rows <= slots and columns <= capacity:
            return
        slots = slots if rows <= slots else min(self.max_rows, max(rows, 2 * slots))
        if columns > capacity:
            grown = max(2 * capacity, 64)
            limit = self.column_limit if self.column_limit is not None and self.column_limit >= columns else None
            capacity = max(columns, grown if limit is None else min(grown, limit))  # past the limit: doubling again
        used = (slice(0, self.rows), slice(None), slice(0, self.length))
        mask = self.mask.new_zeros((slots, capacity))
        mask[: self.rows, : self.length] = self.mask[: self.rows, : self.length]
        self.mask = mask
        for layer in self.layers:
            for name in ("_keys", "_values"):
                old = getattr(layer, name)
                # zeros, not empty: a row's unwritten columns are masked, but a masked NaN key or
                # value still makes its scores and output NaN (0 × NaN), and fresh memory may hold one
                new = old.new_zeros((slots, old.shape[1], capacity, old.shape[3]))
                new[used] = old[used]
                setattr(layer, name, new)
            layer._views()

    def _sync(self) -> None:
        for layer in self.layers:
            layer.rows, layer.length = self.rows, self.length
            layer._views()

    def _shift(self, by: int) -> None:
        """Move every row's columns ``by`` to the right (``by`` < 0: to the left)."""
        rows, length = self.rows, self.length
        new_length = length + by
        self.reserve(rows, new_length)
        tensors = [self.mask] + [getattr(layer, name) for layer in self.layers for name in ("_keys", "_values")]
        for tensor in tensors:
            time_axis = tensor.dim() - 2 if tensor.dim() == 4 else 1
            source = tensor[:rows].narrow(time_axis, max(0, -by), length - max(0, -by)).clone()
            tensor[:rows].narrow(time_axis, max(0, by), source.shape[time_axis]).copy_(source)
        if by > 0:
            self.mask[:rows, :by] = 0
        self.length = new_length
        self._sync()

    def insert(self, prefill, prefill_mask: torch.Tensor) -> None:
        """Append the rows of ``prefill`` (a transformers cache of left-padded prompts, with its
        ``(rows, width)`` attention mask) to the batch."""
        from transformers.cache_utils import Cache

        count, width = prefill_mask.shape
        if self.rows + count > self.max_rows:
            raise ValueError(f"{self.rows} + {count} rows exceed {self.max_rows}")
        if self.cache is None:
            layer_class = _slot_layer_class()
            for layer in prefill.layers:
                keys, values = layer.keys, layer.values
                self.layers.append(
                    layer_class(keys.new_empty((0, keys.shape[1], 0, keys.shape[3])), values.new_empty((0, values.shape[1], 0, values.shape[3])))
                )
            self.mask = self.mask.to(prefill_mask.device)
            self.cache = Cache(layers=self.layers)
        self.reserve(self.rows + count, max(self.length, width))
        if self.rows == 0:
            self.length = 0
        if width > self.length:
            self._shift(width - self.length)
        start, end, first = self.length - width, self.length, self.rows
        for layer, source in zip(self.layers, prefill.layers):
            layer._keys[first : first + count, :, start:end] = source.keys
            layer._values[first : first + count, :, start:end] = source.values
        self.mask[first : first + count, :start] = 0
        self.mask[first : first + count, start:end] = prefill_mask.to(self.mask.device)
        self.rows += count
        self._sync()

    def remove(self, leaving: Sequence[int]) -> list[int]:
        """Drop the rows ``leaving``; returns, for each slot that stays, the slot its row was in."""
        leaving_set = set(leaving)
        rows = self.rows - len(leaving_set)
        order = list(range(rows))
        holes = [slot for slot in sorted(leaving_set) if slot < rows]
        movers = [slot for slot in range(rows, self.rows) if slot not in leaving_set]
        if movers:
            source = torch.tensor(movers, device=self.mask.device)
            target = torch.tensor(holes, device=self.mask.device)
            self.mask[target] = self.mask[source]
            for layer in self.layers:
                for name in ("_keys", "_values"):
                    buffer = getattr(layer, name)
                    buffer[target.to(buffer.device), :, : self.length] = buffer[source.to(buffer.device), :, : self.length]
            for hole, mover in zip(holes, movers):
                order[hole] = mover
        self.rows = rows
        if rows == 0:
            self.length = 0
        self._sync()
        return order

    def trim(self, least: int = 16) -> None:
        """Drop the leading columns no row attends to, when there are at least ``least`` of them
        and they are at least a quarter of the time axis. (Every row attends over the whole axis,
        so dead columns cost every step; a shift costs one copy of the cache.)"""
        if not self.rows:
            return
        used = self.mask[: self.rows, : self.length].any(0).nonzero()
        dead = int(used[0]) if len(used) else self.length
        if dead >= least and 4 * dead >= self.length:
            self._shift(-dead)

    def step_mask(self) -> torch.Tensor | None:
        """The attention mask of a decoding step (one new column for every row), or ``None`` when
        every row attends to every column."""
        self.reserve(self.rows, self.length + 1)
        self.mask[: self.rows, self.length] = 1
        mask = self.mask[: self.rows, : self.length + 1]
        return None if bool(mask.all()) else mask


class Engine:
    """Continuous batching over a :class:`~lora_arith.model.mixing.PreferenceMixer`, on one worker thread.

    Args:
        mixer: the base with its adapters; the engine owns it while it runs.
        max_batch_size: rows decoded together at most.
        max_queue: requests waiting for a free row at most (a request a free row takes does
            not wait: 0 admits only those); :meth:`submit` raises :class:`EngineFull` beyond.
        max_prefill_tokens: prompt tokens prefilled at one step boundary at most (at least one
            request is always admitted when a row is free).
        max_batch_tokens: rows × columns of the batch's KV cache at most (its memory: about 46 KB
            a token for the default base): a request joins only while the batch stays within it
            with every row at its longest, its prompt and all of its ``max_tokens`` (a request
            alone always runs). All rows share one time axis, so one long row makes every row as
            long.
        share_prefix: run the tokens every chat prompt starts with (the chat template's system
            turn and the user header) once per mix and keep their keys and values, instead of
            prefilling them for every request. The same computation up to float rounding.
        observe: ``observe(event, *values)`` is called from the worker thread with ``"step"``
            (rows), ``"first_token"`` (seconds), ``"finished"`` (result, seconds) and ``"failed"``
            (error), e.g. for metrics.
    """

    def __init__(
        self,
        mixer: "PreferenceMixer",
        *,
        max_batch_size: int = 32,
        max_queue: int = 256,
        max_prefill_tokens: int = 2048,
        max_batch_tokens: int = 32768,
        share_prefix: bool = True,
        observe: Callable[..., None] | None = None,
    ) -> None:
        from lora_arith.model.generation import context_length, end_of_turn_ids, most_characters

        require_count(max_batch_size, "max_batch_size")
        require_count(max_prefill_tokens, "max_prefill_tokens")
        require_count(max_batch_tokens, "max_batch_tokens")
        require_count(max_queue, "max_queue", least=0)
        self.mixer, self.tokenizer = mixer, mixer.tokenizer
        self.max_batch_size, self.max_queue, self.max_prefill_tokens = max_batch_size, max_queue, max_prefill_tokens
        self.max_batch_tokens = max_batch_tokens
        self.stop_ids = set(end_of_turn_ids(self.tokenizer))
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.stop_ids, default=0)
        self.context_length = context_length(mixer.model, self.tokenizer)
        self.device = next(mixer.model.parameters()).device
        self._vocabulary = mixer.model.get_input_embeddings().num_embeddings
        self.observe = observe
        self._pending: collections.deque[_Row] = collections.deque()
        self._rows: list[_Row] = []
        self._condition = threading.Condition()
        self._closing = False
        self._deadline: float | None = None
        self._thread = threading.Thread(target=self._loop, name="lora-arith-engine", daemon=True)
        self._tokenizer_lock = threading.Lock()
        self.generated_tokens = 0
        self.steps = 0
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=100)
        self._most_characters = most_characters(self.tokenizer, self.context_length)
        self.prefix_ids = self._template_prefix() if share_prefix else []
        self._prefixes: dict[tuple, list] = {}  # mix -> [(keys, values) of the prefix per layer]

    # -- the API the server uses -------------------------------------------------------------

    def encode(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """The prompt tokens of chat ``messages`` (the chat template, with the assistant header)."""
        from lora_arith.model.generation import chat_prompt

        text = chat_prompt(self.tokenizer, list(messages))
        if len(text) > self._most_characters:  # at least len / longest tokens: too long, without tokenizing it
            raise LoraArithError(
                f"the prompt is {len(text)} characters, more tokens than this model's context of {self.context_length}"
            )
        with self._tokenizer_lock:  # a tokenizer is not safe to call from several threads at once
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _template_prefix(self) -> list[int]:
        """The tokens that every conversation of one user message starts with (none, if the chat
        template cannot be read)."""
        try:
            first, second = (self.encode([{"role": "user", "content": text}]) for text in ("a", "zz\nq"))
        except (LoraArithError, ValueError):
            return []
        shared = 0
        while shared < min(len(first), len(second)) and first[shared] == second[shared]:
            shared += 1
        return first[:shared]

    def __repr__(self) -> str:
        state = "closed" if self._closing else "running" if self._thread.is_alive() else "not started"
        return (
            f"Engine({state}, rows={len(self._rows)}/{self.max_batch_size}, queued={len(self._pending)}, "
            f"steps={self.steps}, tokens={self.generated_tokens})"
        )

    def start(self) -> "Engine":
        """Start the worker thread (once); returns the engine. The mixer is the engine's until
        :meth:`close`: use its :meth:`generate`, not the mixer's."""
        self.mixer._check_open()  # not merged, not held by another running engine
        self.mixer._owner = self._thread
        self._thread.start()
        return self

    def check(self, request: RowRequest) -> None:
        """Refuse a request the worker could not run, before it joins a batch (the server's own
        requests are checked by ``serving.protocol`` first; this catches a library caller's):
        :class:`TypeError` for another object, :class:`OptionError` naming the field otherwise."""
        from lora_arith.lora.specs import check_named_weights
        from lora_arith.serving.protocol import MIN_TEMPERATURE, seed_fits

        if not isinstance(request, RowRequest):
            raise TypeError(f"the engine runs RowRequest objects, not {type(request).__name__}")
        ids, size = request.prompt_ids, self._vocabulary
        if (
            isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence) or not ids
            or not all(type(token) is int and 0 <= token < size for token in ids)
        ):  # fmt: skip
            raise OptionError("prompt_ids", "{} must be a non-empty list of token ids from 0 to {last}", last=size - 1)
        tokens = require_count(request.max_tokens, "max_tokens")
        if len(ids) + tokens > self.context_length:
            raise OptionError(
                "max_tokens", "the prompt's {count} tokens and {} {value} exceed the model's context of {context}",
                count=len(ids), value=tokens, context=self.context_length,
            )  # fmt: skip
        check_named_weights(request.weights, self.mixer.names)
        temperature, top_p, seed = request.temperature, request.top_p, request.seed
        if finite_number(temperature) is None or not (temperature == 0 or MIN_TEMPERATURE <= temperature):
            raise OptionError("temperature", "{} must be 0 (greedy) or at least {low}, not {value!r}",
                              low=MIN_TEMPERATURE, value=temperature)  # fmt: skip
        if finite_number(top_p) is None or not 0 < top_p <= 1:
            raise OptionError("top_p", "{} must be above 0 and at most 1, not {value!r}", value=top_p)
        if not seed_fits(seed):
            raise OptionError("seed", "{} must be a whole number within int64 or None, not {value!r}", value=seed)
        if isinstance(request.stop, (str, bytes)) or not all(isinstance(stop, str) for stop in request.stop):
            raise OptionError("stop", "{} must be a list of strings, not {value!r}", value=request.stop)

    def submit(
        self,
        request: RowRequest,
        on_done: Callable[[RowResult], None],
        on_error: Callable[[BaseException], None],
    ) -> None:
        """Queue ``request``; ``on_done(result)`` or ``on_error(error)`` is called from the
        engine's thread when it ends. Raises :class:`EngineFull` or :class:`EngineClosed`, and
        what :meth:`check` raises for a request that could not run."""
        self.check(request)
        row = _Row(request, self, on_done, on_error)
        with self._condition:
            if self._closing:
                raise EngineClosed("the server is shutting down")
            free = max(0, self.max_batch_size - len(self._rows))  # requests for these rows do not wait
            if len(self._pending) >= self.max_queue + free:
                waiting = len(self._pending) - free
                raise EngineFull(f"{waiting} requests are already waiting; try again shortly")
            self._pending.append(row)
            self._condition.notify()

    def generate(self, requests: Sequence[RowRequest], timeout: float | None = None) -> list[RowResult]:
        """Run ``requests`` to the end and return their results (in order); the first error raises."""
        if not self._thread.is_alive() and not self._closing:  # it would wait for ever
            raise LoraArithError("the engine is not running: call its start() first")
        for request in requests:  # all before any is queued: none runs for nobody
            self.check(request)
        results: list[Any] = [None] * len(requests)
        done = threading.Semaphore(0)

        def reporter(index: int):
            def report(value: Any) -> None:
                results[index] = value
                done.release()

            return report

        for index, request in enumerate(requests):
            self.submit(request, reporter(index), reporter(index))
        for _ in requests:
            if not done.acquire(timeout=timeout):
                raise LoraArithError("generation timed out")
        for value in results:
            if isinstance(value, BaseException):
                raise value
        return results

    @property
    def running(self) -> int:
        """How many rows the batch decodes now."""
        return len(self._rows)

    def queued(self) -> int:
        """How many requests wait to join the batch."""
        return len(self._pending)

    def close(self, timeout: float = 30.0) -> None:
        """Take no more requests; finish the running and queued ones for up to ``timeout`` seconds,
        then fail those left with :class:`EngineClosed`, and stop the worker."""
        with self._condition:
            self._closing = True
            deadline = time.monotonic() + timeout  # a later close never extends an earlier one's deadline
            self._deadline = deadline if self._deadline is None else min(self._deadline, deadline)
            self._condition.notify()
        if self._thread.is_alive():
            self._thread.join(timeout + 10)

    # -- the worker --------------------------------------------------------------------------

    def _observe(self, event: str, *values: Any) -> None:
        if self.observe is not None:
            try:
                self.observe(event, *values)
            except Exception:  # noqa: BLE001 - metrics must not break generation
                pass

    def _admit(self) -> list[_Row]:
        """Pop the waiting requests that join at this boundary (called with the lock held)."""
        admitted: list[_Row] = []
        budget = self.max_prefill_tokens
        while self._pending and len(self._rows) + len(admitted) < self.max_batch_size:
            row = self._pending[0]
            if row.request.cancelled.is_set():
                self._pending.popleft()
                row.done = "cancelled"
                row.finish()
                continue
            size = len(row.request.prompt_ids)
            rows = len(self._rows) + len(admitted) + 1
            if (self._rows or admitted) and (size > budget or rows * self._span([*admitted, row]) > self.max_batch_tokens):
                break
            budget -= size
            admitted.append(self._pending.popleft())
        if admitted:  # the cache's buffers need not grow past it
            self._cache.column_limit = self._span(admitted)
        return admitted

    def _span(self, joining: Sequence[_Row]) -> int:
        """The most columns the batch's time axis can reach once ``joining`` join the running rows:
        every row steps along one right-aligned axis, so it reaches the axis as it will be after
        their prefill, plus the most tokens any row may still generate (trimming only shortens it)."""
        axis = max(self._cache.length, *(len(row.request.prompt_ids) for row in joining))
        rest = max(
            [row.request.max_tokens for row in joining]
            + [row.request.max_tokens - row.generated for row in self._rows]
        )
        return axis + rest

    def _loop(self) -> None:
        from lora_arith.model.decode import FastDecoder

        self._decoder = FastDecoder.for_model(self.mixer.model)  # None: the model's own forward
        handle = self.mixer.row_handle(fused=True)
        self._cache = SlotCache(self.max_batch_size)
        self._next = torch.zeros(self.max_batch_size, dtype=torch.long, device=self.device)
        self._positions = torch.zeros(self.max_batch_size, dtype=torch.long, device=self.device)
        self._batch_etas = self.mixer.row_etas([])
        self._assigned = False  # whether the layers hold the batch's weights (a prefill puts its own)
        error: BaseException = EngineClosed("the server shut down before this request finished")
        try:
            while True:
                with self._condition:
                    while not self._pending and not self._rows and not self._closing:
                        self._condition.wait()
                    if self._closing and (
                        (not self._pending and not self._rows) or time.monotonic() >= (self._deadline or 0)
                    ):
                        break
                    admitted = self._admit()
                with torch.no_grad():
                    if admitted:
                        self._prefill(admitted, handle)
                    if self._rows:
                        self._step(handle)
        except BaseException as crash:  # noqa: BLE001 - a bug in the loop: nobody must wait forever
            error = crash
            raise
        finally:
            handle.restore()
            if self.mixer._owner is self._thread:
                self.mixer._owner = None
            with self._condition:
                self._closing = True
                leftover, self._rows = list(self._pending) + self._rows, []
                self._pending.clear()
            self._rows_failed(leftover, error)

    def _rows_failed(self, rows: Sequence[_Row], error: BaseException) -> None:
        for row in rows:
            row.fail(error)

    def _prefill(self, admitted: list[_Row], handle: "RowWeights") -> None:
        """Prefill the rows that join, append those that go on to the batch."""
        valid = []
        for row in admitted:  # validated before submit; a row whose mix still fails fails alone
            try:
                valid.append((row, self.mixer.row_etas([row.request.weights])))
            except LoraArithError as error:
                row.fail(error)
        shared = len(self.prefix_ids)
        groups: dict[bool, list] = {True: [], False: []}
        for row, etas in valid:
            ids = row.request.prompt_ids
            groups[0 < shared < len(ids) and ids[:shared] == self.prefix_ids].append((row, etas))
        for prefixed, group in groups.items():
            if group:
                self._prefill_group([row for row, _ in group], torch.cat([etas for _, etas in group]), handle, prefixed)

    def _prefix_cache(self, etas: torch.Tensor, handle: "RowWeights"):
        """A transformers cache holding the keys and values of :attr:`prefix_ids` under each row's
        weights (computed once per mix, kept for the last 64 mixes)."""
        from transformers.cache_utils import DynamicCache

        keys = [tuple(row.tolist()) for row in etas]
        ids = torch.tensor([self.prefix_ids], device=self.device)
        for key in dict.fromkeys(key for key in keys if key not in self._prefixes):
            # one mix at a time: a mix's prefix is then computed the same way whatever else is missing
            handle.assign(torch.tensor([key], dtype=torch.float64))
            cache = self.mixer.model(input_ids=ids, cache=DynamicCache(), use_cache=True, logits_to_keep=1).cache
            self._prefixes[key] = [(layer.keys[0], layer.values[0]) for layer in cache.layers]
            while len(self._prefixes) > 64:
                self._prefixes.pop(next(iter(self._prefixes)))
        for key in keys:
            self._prefixes[key] = self._prefixes.pop(key)  # most recently used last
        cache = DynamicCache()
        for index in range(len(self._prefixes[keys[0]])):
            cache.update(
                torch.stack([self._prefixes[key][index][0] for key in keys]),
                torch.stack([self._prefixes[key][index][1] for key in keys]),
                index,
            )
        return cache

    def _prefill_group(self, rows: list[_Row], etas: torch.Tensor, handle: "RowWeights", prefixed: bool) -> None:
        """One prefill forward for ``rows``. With ``prefixed``, every row starts with
        :attr:`prefix_ids`, whose keys and values come from the prefix cache: only the rest is run
        (left-padded: the padding sits between the prefix and the rest, masked)."""
        from transformers.cache_utils import DynamicCache

        from lora_arith.model.generation import left_pad

        skip = len(self.prefix_ids) if prefixed else 0
        ids, mask = left_pad([row.request.prompt_ids[skip:] for row in rows], self.pad_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        try:
            cache = self._prefix_cache(etas, handle) if prefixed else DynamicCache()
            mask = torch.cat([mask.new_ones((len(rows), skip)), mask], dim=-1)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, skip:]
            handle.assign(etas)
            output = self.mixer.model(
                input_ids=ids,
                attention_mask=None if bool(mask.all()) else mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        except Exception as error:  # noqa: BLE001 - the forward of these rows failed: they fail
            return self._rows_failed(rows, error)
        finally:
            self._assigned = False  # the layers hold the prefill's weights
        going = self._take(rows, output.logits[:, -1, :])
        if not going:
            return
        keep = torch.tensor(going, device=self.device)
        prefill = output.cache
        for layer in prefill.layers:
            layer.keys, layer.values = layer.keys[keep], layer.values[keep]
        first = self._cache.rows
        self._cache.trim()
        self._cache.insert(prefill, mask[keep])
        joined = [rows[i] for i in going]
        self._next[first : first + len(joined)] = torch.tensor([row.tokens[-1] for row in joined], device=self.device)
        self._positions[first : first + len(joined)] = mask[keep].sum(-1)
        self._rows.extend(joined)
        self._batch_etas = torch.cat([self._batch_etas, etas[going]]) if first else etas[going]

    def _step(self, handle: "RowWeights") -> None:
        rows = len(self._rows)
        if not self._assigned:
            handle.assign(self._batch_etas)
            self._assigned = True
        mask = self._cache.step_mask()
        try:
            if self._decoder is not None:
                logits = self._decoder(self._next[:rows, None], self._positions[:rows, None], mask, self._cache.layers)
            else:
                logits = self.mixer.model(
                    input_ids=self._next[:rows, None],
                    attention_mask=mask,
                    position_ids=self._positions[:rows, None],
                    cache=self._cache.cache,
                    use_cache=True,
                    logits_to_keep=1,
                ).logits[:, -1, :]
        except Exception as error:  # noqa: BLE001 - the step failed: every row in it fails
            failed, self._rows = self._rows, []
            self._cache = SlotCache(self.max_batch_size)
            return self._rows_failed(failed, error)
        self._cache.length += 1
        self._positions[:rows] += 1
        self.steps += 1
        self.batch_sizes.append(rows)
        self._observe("step", rows)
        going = set(self._take(self._rows, logits))
        leaving = [slot for slot in range(rows) if slot not in going]
        if leaving:
            order = self._cache.remove(leaving)
            index = torch.tensor(order, dtype=torch.long)
            self._rows = [self._rows[slot] for slot in order]
            self._positions[: len(order)] = self._positions[index.to(self.device)].clone()
            self._batch_etas = self._batch_etas[index]
            self._assigned = False
            self._cache.trim()
        if self._rows:
            self._next[: len(self._rows)] = torch.tensor([row.tokens[-1] for row in self._rows], device=self.device)

    def _take(self, rows: Sequence[_Row], logits: torch.Tensor) -> list[int]:
        """Choose each row's next token from its ``logits``, add it, and report the rows that end;
        returns the indices of the rows that go on."""
        scores = logits.to(dtype=torch.float32)
        # one pass: max propagates NaN, so a row with a NaN or +inf logit has a NaN or +inf peak;
        # its index is argmax's (the first of equal maxima)
        peaks, greedy_ids = scores.max(-1)
        broken = (torch.isnan(peaks) | torch.isposinf(peaks)).tolist()
        greedy = greedy_ids.tolist()
        going = []
        for index, row in enumerate(rows):
            try:
                if row.request.cancelled.is_set():
                    row.done = "cancelled"
                elif broken[index]:
                    raise LoraArithError(
                        "the model's logits are NaN or Inf: an adapter weight is too large for this model"
                    )
                else:
                    row.add(self._sample(row, scores[index]) if row.generator is not None else greedy[index])
                    self.generated_tokens += 1
                if row.done:
                    row.finish()
                else:
                    going.append(index)
            except Exception as error:  # noqa: BLE001 - this row fails alone
                row.fail(error)
        return going

    @staticmethod
    def _sample(row: _Row, logits: torch.Tensor) -> int:
        request = row.request
        probabilities = torch.softmax(logits / request.temperature, dim=-1)
        if request.top_p < 1.0:
            ordered, order = probabilities.sort(descending=True)
            outside = ordered.cumsum(-1) - ordered > request.top_p
            ordered[outside] = 0.0
            probabilities = torch.zeros_like(probabilities).scatter(0, order, ordered)
        if not bool(torch.isfinite(probabilities).all()) or float(probabilities.sum()) <= 0:
            raise LoraArithError("sampling failed: the probabilities are not finite")
        return int(torch.multinomial(probabilities.cpu(), 1, generator=row.generator))


def greedy_completions(
    mixer: "PreferenceMixer",
    prompt_ids: Sequence[Sequence[int]],
    weights: Sequence[Any],
    *,
    max_new_tokens: int,
    max_batch_size: int,
    share_prefix: bool = True,
    progress: bool = False,
) -> list[str]:
    """Greedy completions of tokenized chat prompts, row ``i`` mixed with ``weights[i]`` (a mapping
    name → η; names left out, or ``None``, keep the mixer's weights), on an engine of its own
    (started and closed here: ``sweep`` and ``generate`` use the engine ``serve`` uses). Raises the
    first row's error, if any."""
    engine = Engine(
        mixer,
        max_batch_size=max(1, max_batch_size),
        max_queue=len(prompt_ids),
        max_prefill_tokens=max(2048, sum(len(ids) for ids in prompt_ids)),
        max_batch_tokens=sys.maxsize,  # the caller's batch size bounds the batch, as it did before the engine
        share_prefix=share_prefix,
    )
    requests = [RowRequest(list(ids), dict(row or {}), max_tokens=max_new_tokens) for ids, row in zip(prompt_ids, weights)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(requests), desc="generating", unit="reply", leave=False)
        engine.observe = lambda event, *values: bar.update() if event in ("finished", "failed") else None
    engine.start()
    try:
        return [result.text for result in engine.generate(requests)]
    finally:
        engine.close(timeout=0)
        if bar is not None:
            bar.close()
