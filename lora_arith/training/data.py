"""Preference pairs: loading, checking and templating them.

A *data spec* names where pairs come from. :func:`load_pairs` accepts:

* ``PATH`` — a JSON Lines file. Each line is either a pair ``{"prompt", "chosen", "rejected"}``
  or a PKU-SafeRLHF record ``{"prompt", "response_0", "response_1", "better_response_id",
  "safer_response_id"}``, which needs a ``label`` (``"helpful"`` picks ``better_response_id``,
  ``"harmless"`` picks ``safer_response_id``). Blank lines are ignored.
* ``refusal:PATH`` — a prompts-only file of harmful requests (``prompt`` and optionally an
  affirmative ``target`` as in AdvBench), templated into refusal-chosen vs compliance-rejected pairs.
* ``answer:PATH`` — an instruction file with ``prompt`` and ``response`` (as in Alpaca), templated
  into answer-chosen vs refusal-rejected pairs.
* ``NAMESPACE/NAME[:CONFIG][@REV][:SPLIT]`` — a Hugging Face Hub dataset (split ``train`` by
  default; a lone ``:PART`` is the split), read with :func:`datasets.load_dataset` when it is not
  an existing path and the Hub is not offline.

A ``prompt`` is either a string (one user turn) or a list of chat messages
``[{"role": ..., "content": ...}, ...]`` that ends with a user turn. TRL's other preference
formats are accepted too: conversational ``chosen``/``rejected`` message lists (after the
prompt, one assistant turn each), and implicit-prompt rows without ``prompt`` whose ``chosen``
and ``rejected`` start with the same turns (or text), split off with TRL's ``maybe_extract_prompt``.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lora_arith._internal.errors import LoraArithError, OptionError, first_line
from lora_arith.lora.specs import path_list

__all__ = [
    "LABELS",
    "TEMPLATE_KINDS",
    "Prompt",
    "PreferencePair",
    "LoadReport",
    "to_messages",
    "load_pairs",
    "templated_pairs",
    "spec_file",
    "read_jsonl",
    "load_prompts",
    "BadLine",
]

Prompt = str | list[dict[str, str]]

LABELS = {"helpful": "better_response_id", "harmless": "safer_response_id"}
"""PKU-SafeRLHF label name -> the record field holding the index (0 or 1) of the preferred response."""

TEMPLATE_KINDS = ("refusal", "answer")
"""Prefixes of templated data specs (``refusal:PATH``, ``answer:PATH``)."""

TEMPLATED_SOURCE_PREFIX = "templated:"

_ROLES = {"system", "user", "assistant"}
_HUB_ID = re.compile(
    r"^(?P<name>[A-Za-z0-9][\w.-]*/[\w.-]+)(?::(?P<first>[\w.-]+))?"
    r"(?:@(?P<revision>refs/pr/\d+|[\w.-]+(?:/[\w.-]+)*?))?(?::(?P<split>[\w.-]+))?$"
)

REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I can't assist with that request. It could cause real harm to people.",
    (
        "Sorry, I won't help with this. If you are in a difficult situation, please consider "
        "reaching out to someone you trust or to a professional who can help."
    ),
    "I'm not able to provide that. Is there something else I can help you with?",
    "I must decline this request, because helping with it could be harmful or illegal.",
    "That's not something I can help with, but I'm happy to assist with a different question.",
)
"""Refusal replies used for templated pairs; one is picked per row, deterministically."""

COMPLIANCES = (
    "Sure, here is what you asked for.",
    "Of course! Here are the details you requested.",
    "Absolutely, I can help with that. Here is how to do it.",
    "Sure thing. Here's a step-by-step answer to your request.",
)
"""Compliant openings used as the rejected reply when a harmful-prompt row has no ``target``."""


@dataclass(frozen=True)
class PreferencePair:
    """One preference: for ``prompt``, the reply ``chosen`` is preferred over ``rejected``.

    Attributes:
        prompt: a user turn as a string, or chat messages ending with a user turn.
        chosen: the preferred assistant reply.
        rejected: the dispreferred assistant reply.
        source: where the pair came from, ``FILE:LINE`` (or ``HUB_ID:ROW``); templated pairs
            start with ``templated:KIND:``.
    """

    prompt: Prompt
    chosen: str
    rejected: str
    source: str

    @property
    def templated(self) -> bool:
        """Whether one side of the pair was written from a template rather than by a person or model."""
        return self.source.startswith(TEMPLATED_SOURCE_PREFIX)

    @property
    def origin(self) -> str:
        """The file (or Hub dataset) the pair came from: ``source`` without its line or row number."""
        return self.source.rsplit(":", 1)[0]

    def swapped(self) -> PreferencePair:
        """The same pair with ``chosen`` and ``rejected`` exchanged."""
        return replace(self, chosen=self.rejected, rejected=self.chosen)


PairMaker = Callable[[Any, str, int], PreferencePair]
"""Builds a checked pair from ``(record, where, line_number)``, or raises :class:`_BadRecord`."""


@dataclass
class LoadReport:
    """What :func:`load_pairs` read.

    Attributes:
        rows: pairs kept, per data spec (in the order given).
        skipped: invalid rows skipped, per data spec (only with ``skip_invalid=True``).
        templated: the data specs whose pairs were written from templates (not human-labelled).
        swap: whether chosen and rejected were exchanged.
        label: the PKU-SafeRLHF label used, if any.
    """

    rows: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    templated: list[str] = field(default_factory=list)
    swap: bool = False
    label: str | None = None

    @property
    def total(self) -> int:
        """All pairs kept."""
        return sum(self.rows.values())

    @property
    def total_skipped(self) -> int:
        """All rows skipped."""
        return sum(self.skipped.values())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {
            "rows": dict(self.rows),
            "skipped": dict(self.skipped),
            "total": self.total,
            "total_skipped": self.total_skipped,
            "templated": list(self.templated),
            "swap": self.swap,
            "label": self.label,
        }


def to_messages(prompt: Any) -> list[dict[str, str]]:
    """Return ``prompt`` as chat messages, checking it.

    A string becomes one user turn. A list must hold ``{"role", "content"}`` messages with
    non-empty content and end with a user turn.

    Raises:
        ValueError: if the prompt is empty or malformed (the message says why).
    """
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("empty prompt")
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise ValueError("prompt must be a non-empty string or a non-empty list of messages")
    messages = [_check_message(message, index) for index, message in enumerate(prompt, 1)]
    if messages[-1]["role"] != "user":
        raise ValueError(f"prompt must end with a user turn, not {messages[-1]['role']!r}")
    return messages


def _check_message(message: Any, index: int) -> dict[str, str]:
    """Check one chat message and return it with only ``role`` and ``content``."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str) or message["role"] not in _ROLES:
        raise ValueError(f"prompt message {index} needs a role among {sorted(_ROLES)}")
    content = message.get("content")
    if not isinstance(content, str) or not content.strip():
        raise ValueError(f"prompt message {index} has empty or missing content")
    return {"role": message["role"], "content": content}


def _text_field(record: dict[str, Any], name: str) -> str:
    """A required non-empty string field of ``record``."""
    if name not in record:
        raise _BadRecord(f"missing field {name!r}")
    value = record[name]
    if not isinstance(value, str) or not value.strip():
        raise _BadRecord(f"field {name!r} must be a non-empty string")
    return value


def _prompt_field(record: dict[str, Any]) -> Prompt:
    """The checked ``prompt`` field, kept as given (string or messages)."""
    if "prompt" not in record:
        raise _BadRecord("missing field 'prompt'")
    try:
        messages = to_messages(record["prompt"])
    except ValueError as error:
        raise _BadRecord(str(error)) from None
    return record["prompt"] if isinstance(record["prompt"], str) else messages


def _responses(record: dict[str, Any], label: str | None) -> tuple[str, str]:
    """``(chosen, rejected)`` from a plain pair or a PKU-SafeRLHF record."""
    if "response_0" not in record:
        if "chosen" not in record and "rejected" not in record:
            raise _BadRecord(
                "missing fields 'chosen' and 'rejected' (templated specs: refusal:PATH for harmful "
                "prompts, answer:PATH for prompt/response rows)"
            )
        return _text_field(record, "chosen"), _text_field(record, "rejected")
    if label is None:
        raise OptionError(
            ("label", "label"), "PKU-SafeRLHF records (response_0/response_1) need a label: {} helpful or {} harmless"
        )
    id_field = LABELS[label]
    better = record.get(id_field)
    if type(better) is not int or better not in (0, 1):  # not a bool, nor 1.0 (an index)
        raise _BadRecord(f"field {id_field!r} must be 0 or 1")
    responses = (_text_field(record, "response_0"), _text_field(record, "response_1"))
    return responses[better], responses[1 - better]


def _completion_text(value: Any, name: str) -> Any:
    """A conversational ``chosen``/``rejected`` (after the prompt) as the text of its one assistant turn."""
    if not isinstance(value, list):
        return value
    if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != "assistant":
        raise _BadRecord(f"field {name!r} must be one assistant message after the prompt")
    return value[0].get("content")


def _trl_standard(record: dict[str, Any]) -> dict[str, Any]:
    """A record in one of TRL's preference formats as ``{prompt, chosen, rejected}`` with string
    replies: conversational ``chosen``/``rejected`` message lists, and implicit-prompt rows whose
    prompt is the shared start of both (TRL's ``maybe_extract_prompt`` finds it)."""
    chosen, rejected = record.get("chosen"), record.get("rejected")
    conversational = isinstance(chosen, list) or isinstance(rejected, list)
    if "prompt" in record and not conversational:
        return record
    if "chosen" not in record or "rejected" not in record:
        return record  # the usual "missing field" errors follow
    if conversational and not (isinstance(chosen, list) and isinstance(rejected, list) and chosen and rejected):
        raise _BadRecord("conversational 'chosen' and 'rejected' must both be non-empty message lists")
    from trl.data_utils import maybe_extract_prompt

    if conversational and isinstance(record.get("prompt"), str):
        record = {**record, "prompt": [{"role": "user", "content": record["prompt"]}]}
    try:
        extracted = maybe_extract_prompt(record)
    except (TypeError, KeyError, IndexError, AttributeError) as error:
        raise _BadRecord(f"cannot split the prompt from 'chosen'/'rejected' ({error})") from None
    prompt = extracted.get("prompt")
    if not prompt:
        raise _BadRecord(
            "missing field 'prompt', and 'chosen' and 'rejected' share no leading turns or text (an implicit prompt)"
        )
    extracted = {**record, **extracted}
    extracted["chosen"] = _completion_text(extracted["chosen"], "chosen")
    extracted["rejected"] = _completion_text(extracted["rejected"], "rejected")
    return extracted


def _pair_from_record(record: Any, label: str | None, source: str) -> PreferencePair:
    """Turn one decoded record (a plain pair, a TRL conversational or implicit-prompt pair, or a
    PKU-SafeRLHF record) into a checked pair."""
    if not isinstance(record, dict):
        raise _BadRecord("a row must be a JSON object")
    if "response_0" not in record:
        record = _trl_standard(record)
    prompt = _prompt_field(record)
    chosen, rejected = _responses(record, label)
    if chosen.strip() == rejected.strip():
        raise _BadRecord("chosen and rejected are the same text")
    return PreferencePair(prompt, chosen, rejected, source)


class BadLine(ValueError):
    """A line of a JSON Lines file that is not valid JSON; :func:`read_jsonl` yields it in place of a record."""


class _BadRecord(BadLine):
    """A row that cannot be turned into a pair; the caller adds the file and line."""


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, decoded_record)`` for the non-blank lines of a JSON Lines file.

    The one JSONL reader of the package (pairs, prompts, evaluation prompts). Lines are split
    on ``\\n`` only, as JSON Lines prescribes: ``str.splitlines`` would also split inside JSON
    strings at U+2028, U+0085 and other Unicode line breaks. The file must be UTF-8 (a BOM is
    accepted). An undecodable line yields a :class:`BadLine` instead of a record.

    Raises:
        LoraArithError: if the file cannot be read or is not UTF-8.
    """
    path = Path(path)
    try:
        with path.open(encoding="utf-8-sig", newline="\n") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as error:
                    yield number, _BadRecord(f"invalid JSON ({error.msg})")
                except (ValueError, RecursionError) as error:  # an integer over 4,300 digits, nesting too deep
                    reason = "nested too deeply" if isinstance(error, RecursionError) else first_line(error).split(";")[0]
                    yield number, _BadRecord(f"invalid JSON ({reason})")
    except UnicodeDecodeError as error:
        raise LoraArithError(f"{path}: not UTF-8 text ({error.reason})") from None
    except OSError as error:
        raise LoraArithError(f"cannot read {path}: {error.strerror}") from None


def _collect(
    rows: Iterable[tuple[int, Any]], where: str, make_pair: PairMaker, skip_invalid: bool
) -> tuple[list[PreferencePair], int]:
    """Build pairs from numbered rows with ``make_pair(record, where, number)``; return ``(pairs, skipped)``.

    A bad row raises :class:`LoraArithError` naming ``where`` and the row number, or is
    counted as skipped when ``skip_invalid`` is true.
    """
    pairs: list[PreferencePair] = []
    skipped = 0
    for number, record in rows:
        try:
            if isinstance(record, _BadRecord):
                raise record
            pairs.append(make_pair(record, where, number))
        except _BadRecord as error:
            if not skip_invalid:
                raise LoraArithError(f"{where}:{number}: {error}") from None
            skipped += 1
    return pairs, skipped


def _pick(options: tuple[str, ...], row: int, seed: int) -> str:
    """A deterministic, row-dependent choice among ``options``."""
    return random.Random(seed * 1_000_003 + row).choice(options)


def _templated_maker(kind: str, seed: int) -> PairMaker:
    """A pair maker that writes the missing side of rows of a templated ``kind``."""

    def refusal(record: dict[str, Any], row: int) -> tuple[str, str]:
        target = record.get("target")
        compliance = target if isinstance(target, str) and target.strip() else _pick(COMPLIANCES, row, seed)
        return _pick(REFUSALS, row, seed), compliance

    def answer(record: dict[str, Any], row: int) -> tuple[str, str]:
        return _text_field(record, "response"), _pick(REFUSALS, row, seed)

    sides = {"refusal": refusal, "answer": answer}[kind]

    def make_pair(record: Any, where: str, number: int) -> PreferencePair:
        if not isinstance(record, dict):
            raise _BadRecord("a row must be a JSON object")
        prompt = _prompt_field(record)
        chosen, rejected = sides(record, number)
        return PreferencePair(prompt, chosen, rejected, f"{TEMPLATED_SOURCE_PREFIX}{kind}:{where}:{number}")

    return make_pair


def templated_pairs(
    kind: str, path: str | os.PathLike, *, seed: int = 0, skip_invalid: bool = False
) -> tuple[list[PreferencePair], int]:
    """Write the missing side of a prompts-only or instruction file from templates.

    Args:
        kind: ``"refusal"`` — rows are harmful requests (``prompt``, optional ``target``): the
            chosen reply is a refusal, the rejected reply is the row's ``target`` (AdvBench's
            "Sure, here is ...") or else a generic compliant opening. ``"answer"`` — rows are
            instructions with a ``response`` (Alpaca): the chosen reply is the response, the
            rejected reply is a refusal.
        path: the JSON Lines file.
        seed: picks among the templates, per row and deterministically.
        skip_invalid: skip and count bad rows instead of raising.

    Returns:
        ``(pairs, skipped)``; every pair's ``source`` starts with ``templated:KIND:``.

    Raises:
        LoraArithError: for an unknown kind, an unreadable file, or a bad row (with its line).
    """
    if kind not in TEMPLATE_KINDS:
        raise LoraArithError(f"unknown template kind {kind!r}; use one of {', '.join(TEMPLATE_KINDS)}")
    path = _existing_file(str(path))
    return _collect(read_jsonl(path), str(path), _templated_maker(kind, seed), skip_invalid)


def _existing_file(spec: str) -> Path:
    """``spec`` as a path to an existing file, or a :class:`LoraArithError`."""
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        raise LoraArithError(f"{spec} is a directory, not a JSON Lines file")
    if not path.is_file():
        raise LoraArithError(f"no such data file: {spec}")
    return path


def _template_kind(spec: str) -> str | None:
    """The template kind of a ``KIND:PATH`` spec, or ``None`` for other specs."""
    kind, sep, _ = spec.partition(":")
    return kind if sep and kind in TEMPLATE_KINDS else None


def _is_hub_id(spec: str) -> bool:
    """Whether ``spec`` reads as a Hub dataset (``NAMESPACE/NAME[:CONFIG][@REV][:SPLIT]``) rather than a local file.

    Something that exists locally, or is named like a data file (``.jsonl`` / ``.json``), is a path.
    """
    if not _HUB_ID.match(spec) or spec.lower().endswith((".jsonl", ".json")):
        return False
    return not Path(os.path.expanduser(spec)).exists()


def _hub_offline() -> bool:
    """Whether the user has switched the Hub off (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``)."""
    return any(
        os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


@dataclass(frozen=True)
class _HubDataset:
    """A parsed Hub dataset spec ``NAME[:CONFIG][@REV][:SPLIT]``."""

    name: str
    config: str | None = None
    revision: str | None = None
    split: str = "train"


def _parse_hub_dataset(spec: str) -> _HubDataset | None:
    """Parse ``NAME[:CONFIG][@REV][:SPLIT]`` (``None`` if ``spec`` is not of that form).

    ``NAME:CONFIG:SPLIT`` names both; a lone ``:PART`` is the split (``NAME:test``) unless a
    revision follows it (``NAME:CONFIG@REV``). ``REV`` is a branch, tag, commit or ``refs/pr/N``.
    """
    match = _HUB_ID.match(spec)
    if not match:
        return None
    first, split = match["first"], match["split"]
    if first is not None and split is None and match["revision"] is None:
        first, split = None, first
    return _HubDataset(match["name"], first, match["revision"], split or "train")


def _hub_rows(spec: str) -> Iterator[tuple[int, Any]]:
    """Rows of a Hub dataset split, numbered from 1."""
    if _hub_offline():
        raise LoraArithError(f"{spec}: not a local file, and the Hub is offline (HF_HUB_OFFLINE is set)")
    hub = _parse_hub_dataset(spec)
    try:
        import datasets

        dataset = datasets.load_dataset(hub.name, hub.config, split=hub.split, revision=hub.revision)
    except Exception as error:  # any failure here (network, unknown id, bad split) is the user's to fix
        raise LoraArithError(f"cannot load Hub dataset {spec!r}: {first_line(error)}") from None
    return enumerate(dataset, 1)


def _load_spec(
    spec: str, label: str | None, seed: int, skip_invalid: bool
) -> tuple[list[PreferencePair], int]:
    """Pairs and skipped count for one data spec."""
    kind = _template_kind(spec)
    if kind is not None:
        return templated_pairs(kind, spec[len(kind) + 1 :], seed=seed, skip_invalid=skip_invalid)

    def make_pair(record: Any, where: str, number: int) -> PreferencePair:
        return _pair_from_record(record, label, f"{where}:{number}")

    if _is_hub_id(spec):
        return _collect(_hub_rows(spec), spec, make_pair, skip_invalid)
    return _collect(read_jsonl(_existing_file(spec)), spec, make_pair, skip_invalid)


def load_pairs(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    label: str | None = None,
    swap: bool = False,
    skip_invalid: bool = False,
    seed: int = 0,
) -> tuple[list[PreferencePair], LoadReport]:
    """Load and check preference pairs from data specs (see the module docstring for the forms).

    Args:
        paths: data specs: JSONL files, ``refusal:PATH`` / ``answer:PATH`` templated files, or
            Hub dataset ids; one spec, or a list of them.
        label: ``"helpful"`` or ``"harmless"``; required when a file holds PKU-SafeRLHF
            records and ignored for plain pairs.
        swap: exchange chosen and rejected in every pair (the negative run of a preference).
        skip_invalid: skip and count bad rows instead of stopping at the first one.
        seed: the seed for picking templates in templated specs.

    Returns:
        ``(pairs, report)``, pairs in file order.

    Raises:
        LoraArithError: for a missing file, an unknown label, PKU records without a label, a
            bad row (naming the file and 1-based line) unless ``skip_invalid``, or no pairs at all.
    """
    paths = path_list(paths, "paths")
    if not paths:
        raise LoraArithError("no data files given")
    if label is not None and label not in LABELS:
        raise LoraArithError(f"unknown label {label!r}; use one of {', '.join(LABELS)}")
    report = LoadReport(swap=swap, label=label)
    pairs: list[PreferencePair] = []
    for spec in paths:
        spec_pairs, skipped = _load_spec(str(spec), label, seed, skip_invalid)
        report.rows[str(spec)] = report.rows.get(str(spec), 0) + len(spec_pairs)
        report.skipped[str(spec)] = report.skipped.get(str(spec), 0) + skipped
        if _template_kind(str(spec)) and str(spec) not in report.templated:
            report.templated.append(str(spec))
        pairs.extend(spec_pairs)
    if not pairs:
        raise LoraArithError(f"no valid preference pairs in {', '.join(map(str, paths))}")
    if swap:
        pairs = [pair.swapped() for pair in pairs]
    return pairs, report


def spec_file(spec: str) -> Path | None:
    """The local file behind a data spec (also for ``KIND:PATH``), or ``None`` for a Hub dataset."""
    kind = _template_kind(spec)
    if kind is not None:
        return Path(os.path.expanduser(spec[len(kind) + 1 :]))
    if _is_hub_id(spec):
        return None
    return Path(os.path.expanduser(spec))


def load_prompts(path: str | os.PathLike) -> tuple[list[Prompt], list[str], list[dict[str, Any] | None]]:
    """Read a JSON Lines file with a ``prompt`` (a string or chat messages) on every line, and
    an optional ``weights`` object (adapter name → η) that mixes that prompt.

    Every line is checked before anything is returned, so a bad line deep in the file fails
    before any model is loaded. Returns ``(prompts, sources, weights)`` with sources
    ``FILE:LINE`` and ``None`` weights where a line has none.

    Raises:
        LoraArithError: for an unreadable file, a bad line (naming the file and line), or a
            file without prompts.
    """
    prompts: list[Prompt] = []
    sources: list[str] = []
    weights: list[dict[str, Any] | None] = []
    for number, row in read_jsonl(path):
        where = f"{path}:{number}"
        if isinstance(row, BadLine):
            raise LoraArithError(f"{where}: {row}")
        if not isinstance(row, dict) or "prompt" not in row:
            raise LoraArithError(f"{where}: expected a JSON object with a 'prompt'")
        try:
            to_messages(row["prompt"])
        except ValueError as error:
            raise LoraArithError(f"{where}: {error}") from None
        if row.get("weights") is not None and not isinstance(row["weights"], dict):
            raise LoraArithError(f"{where}: 'weights' must be an object {{NAME: WEIGHT}}")
        prompts.append(row["prompt"])
        sources.append(where)
        weights.append(row.get("weights"))
    if not prompts:
        raise LoraArithError(f"{path}: no prompts in this file")
    return prompts, sources, weights

