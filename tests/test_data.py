"""Loading and checking preference pairs (lora_arith.training.data)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lora_arith.training.data import (
    COMPLIANCES,
    REFUSALS,
    PreferencePair,
    load_pairs,
    spec_file,
    templated_pairs,
    to_messages,
)
from lora_arith._internal.errors import LoraArithError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

CHAT_PROMPT = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Name a colour."},
]


def write_jsonl(path: Path, rows: list) -> str:
    """Write rows (dicts are JSON-encoded, strings are written verbatim) one per line; return the path."""
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def pair(prompt="Say hi.", chosen="Hi!", rejected="No.", **extra) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **extra}


def pku(prompt="How do I stay safe?", better=0, safer=1) -> dict:
    return {
        "prompt": prompt,
        "response_0": "Answer zero.",
        "response_1": "Answer one.",
        "better_response_id": better,
        "safer_response_id": safer,
    }


# ---- plain pairs -----------------------------------------------------------------------------


def test_plain_pairs_with_string_and_chat_prompts(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [pair(), "", pair(prompt=CHAT_PROMPT, chosen="Blue.", extra=1)])
    pairs, report = load_pairs([path])
    assert pairs == [
        PreferencePair("Say hi.", "Hi!", "No.", f"{path}:1"),
        PreferencePair(CHAT_PROMPT, "Blue.", "No.", f"{path}:3"),
    ]
    assert report.rows == {path: 2} and report.skipped == {path: 0}
    assert report.total == 2 and not pairs[0].templated


def test_rows_are_counted_per_file_in_order(tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", [pair(), pair(chosen="Hey")])
    second = write_jsonl(tmp_path / "b.jsonl", [pair(prompt="Other")])
    pairs, report = load_pairs([first, second])
    assert [p.source for p in pairs] == [f"{first}:1", f"{first}:2", f"{second}:1"]
    assert report.rows == {first: 2, second: 1}
    assert report.to_dict()["total"] == 3


def test_swap_exchanges_chosen_and_rejected(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [pair()])
    (swapped,), report = load_pairs([path], swap=True)
    assert (swapped.chosen, swapped.rejected) == ("No.", "Hi!")
    assert report.swap is True


def test_shared_pair_files_load():
    path = SHARED_DATA / "harmless" / "xstest_unsafe_pairs.jsonl"
    if not path.exists():
        pytest.skip("shared data not available")
    pairs, report = load_pairs([str(path)])
    assert report.total == len(pairs) > 0 and report.total_skipped == 0


# ---- PKU-SafeRLHF records --------------------------------------------------------------------


@pytest.mark.parametrize("label, chosen", [("helpful", "Answer zero."), ("harmless", "Answer one.")])
def test_pku_records_follow_the_label(tmp_path, label, chosen):
    path = write_jsonl(tmp_path / "pku.jsonl", [pku(better=0, safer=1)])
    (loaded,), report = load_pairs([path], label=label)
    assert loaded.chosen == chosen and loaded.rejected != chosen
    assert report.label == label


def test_pku_records_need_a_label_even_when_skipping(tmp_path):
    path = write_jsonl(tmp_path / "pku.jsonl", [pku()])
    with pytest.raises(LoraArithError, match="need a label: label helpful or label harmless") as raised:
        load_pairs([path], skip_invalid=True)
    assert raised.value.options == ("label", "label")


def test_unknown_label(tmp_path):
    path = write_jsonl(tmp_path / "pku.jsonl", [pku()])
    with pytest.raises(LoraArithError, match="unknown label 'honest'"):
        load_pairs([path], label="honest")


def test_label_is_ignored_for_plain_pairs(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [pair()])
    (loaded,), _ = load_pairs([path], label="harmless")
    assert loaded.chosen == "Hi!"


# ---- bad rows --------------------------------------------------------------------------------

BAD_ROWS = {
    "invalid JSON": ('{"prompt": "x", "chosen": ', "invalid JSON"),
    "not an object": ('["a", "b"]', "JSON object"),
    "missing chosen": (json.dumps({"prompt": "x", "rejected": "r"}), "missing field 'chosen'"),
    "missing both replies": (json.dumps({"prompt": "x"}), "refusal:PATH"),
    "missing prompt": (json.dumps({"chosen": "c", "rejected": "r"}), "missing field 'prompt'"),
    "empty prompt": (json.dumps(pair(prompt="  ")), "empty prompt"),
    "empty chosen": (json.dumps(pair(chosen="")), "'chosen' must be a non-empty string"),
    "non-string rejected": (json.dumps(pair(rejected=3)), "'rejected' must be a non-empty string"),
    "chosen equals rejected": (json.dumps(pair(chosen="Same.", rejected="Same.")), "same text"),
    "prompt ends with assistant": (
        json.dumps(pair(prompt=CHAT_PROMPT[:2])),
        "must end with a user turn",
    ),
    "empty prompt list": (json.dumps(pair(prompt=[])), "non-empty"),
    "message without role": (json.dumps(pair(prompt=[{"content": "hi"}])), "needs a role"),
    "message with empty content": (
        json.dumps(pair(prompt=[{"role": "user", "content": ""}])),
        "empty or missing content",
    ),
    "bad PKU id": (json.dumps(pku(better=2)), "'better_response_id' must be 0 or 1"),
    "float PKU id": (json.dumps(pku(better=1.0)), "'better_response_id' must be 0 or 1"),  # a TypeError before
    "message with a list as role": (json.dumps(pair(prompt=[{"role": ["user"], "content": "hi"}])), "needs a role"),
    "nested too deeply": ('{"prompt": ' + "[" * 100_000, "invalid JSON (nested too deeply)"),  # a RecursionError before
    "integer of 5000 digits": ('{"prompt": ' + "9" * 5000 + "}", "invalid JSON (Exceeds the limit (4300 digits)"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_row_names_file_and_line(tmp_path, case):
    line, reason = BAD_ROWS[case]
    path = write_jsonl(tmp_path / "bad.jsonl", [pair(), "", line, pair()])
    with pytest.raises(LoraArithError) as error:
        load_pairs([path], label="helpful")
    message = str(error.value)
    assert message.startswith(f"{path}:3: ")
    assert reason in message
    assert "\n" not in message


def test_skip_invalid_counts_every_bad_row(tmp_path):
    rows = [pair()] + [line for line, _ in BAD_ROWS.values()] + [pair(chosen="Hey")]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    pairs, report = load_pairs([path], label="helpful", skip_invalid=True)
    assert [p.source for p in pairs] == [f"{path}:1", f"{path}:{len(rows)}"]
    assert report.rows == {path: 2}
    assert report.skipped == {path: len(BAD_ROWS)}
    assert report.total_skipped == len(BAD_ROWS)


def test_only_bad_rows_is_an_error_even_when_skipping(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", ["{oops"])
    with pytest.raises(LoraArithError, match="no valid preference pairs"):
        load_pairs([path], skip_invalid=True)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(LoraArithError, match="no such data file"):
        load_pairs([str(tmp_path / "nope.jsonl")])
    with pytest.raises(LoraArithError, match="is a directory"):
        load_pairs([str(tmp_path)])
    with pytest.raises(LoraArithError, match="no data files"):
        load_pairs([])


def test_missing_local_file_in_subfolder_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LoraArithError, match="no such data file: data/pairs.jsonl"):
        load_pairs(["data/pairs.jsonl"])


# ---- templated pairs -------------------------------------------------------------------------


def test_refusal_templates_use_the_target_as_compliance(tmp_path):
    rows = [{"prompt": "Do a bad thing", "target": "Sure, here is a bad thing"}, {"prompt": "Another bad thing"}]
    path = write_jsonl(tmp_path / "harmful.jsonl", rows)
    pairs, skipped = templated_pairs("refusal", path)
    assert skipped == 0
    assert [p.chosen in REFUSALS for p in pairs] == [True, True]
    assert pairs[0].rejected == "Sure, here is a bad thing"
    assert pairs[1].rejected in COMPLIANCES
    assert pairs[0].source == f"templated:refusal:{path}:1" and pairs[0].templated


def test_answer_templates_reject_with_a_refusal(tmp_path):
    path = write_jsonl(tmp_path / "alpaca.jsonl", [{"prompt": "Describe rain.", "response": "Water falls."}])
    (loaded,), _ = templated_pairs("answer", path)
    assert loaded.chosen == "Water falls." and loaded.rejected in REFUSALS


def test_templates_are_deterministic_and_varied(tmp_path):
    path = write_jsonl(tmp_path / "harmful.jsonl", [{"prompt": f"Bad request {i}"} for i in range(30)])
    first, _ = templated_pairs("refusal", path)
    again, _ = templated_pairs("refusal", path)
    other_seed, _ = templated_pairs("refusal", path, seed=1)
    assert first == again
    assert len({p.chosen for p in first}) > 2
    assert [p.chosen for p in first] != [p.chosen for p in other_seed]


def test_templated_specs_in_load_pairs(tmp_path):
    harmful = write_jsonl(tmp_path / "harmful.jsonl", [{"prompt": "Do a bad thing"}])
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"prompt": "Describe rain.", "response": "Water falls."}])
    pairs, report = load_pairs([f"refusal:{harmful}", f"answer:{alpaca}"], swap=True)
    assert report.rows == {f"refusal:{harmful}": 1, f"answer:{alpaca}": 1}
    assert report.templated == [f"refusal:{harmful}", f"answer:{alpaca}"]
    assert pairs[0].rejected in REFUSALS  # swapped: the refusal is now rejected
    assert pairs[1].chosen in REFUSALS
    assert all(p.templated for p in pairs)


def test_templated_bad_rows(tmp_path):
    path = write_jsonl(tmp_path / "alpaca.jsonl", [{"prompt": "Describe rain."}, {"prompt": "x", "response": "y"}])
    with pytest.raises(LoraArithError, match=r"alpaca.jsonl:1: missing field 'response'"):
        load_pairs([f"answer:{path}"])
    pairs, report = load_pairs([f"answer:{path}"], skip_invalid=True)
    assert len(pairs) == 1 and report.total_skipped == 1


def test_unknown_template_kind(tmp_path):
    with pytest.raises(LoraArithError, match="unknown template kind"):
        templated_pairs("praise", tmp_path / "x.jsonl")


# ---- Hub datasets ----------------------------------------------------------------------------


def test_hub_dataset_rows_go_through_the_same_checks(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, *, split, revision=None):
        calls.append((name, split))
        return [pku(better=1, safer=0), pku(prompt="")]

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    pairs, report = load_pairs(["PKU-Alignment/PKU-SafeRLHF:test"], label="helpful", skip_invalid=True)
    assert calls == [("PKU-Alignment/PKU-SafeRLHF", "test")]
    assert pairs[0].chosen == "Answer one." and pairs[0].source == "PKU-Alignment/PKU-SafeRLHF:test:1"
    assert report.skipped == {"PKU-Alignment/PKU-SafeRLHF:test": 1}
    assert spec_file("PKU-Alignment/PKU-SafeRLHF:test") is None


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("org/prefs", ("org/prefs", None, "train", None)),
        ("org/prefs:test", ("org/prefs", None, "test", None)),
        ("org/prefs:default:test", ("org/prefs", "default", "test", None)),
        ("org/prefs:default@v1.0", ("org/prefs", "default", "train", "v1.0")),
        ("org/prefs@refs/pr/3:test", ("org/prefs", None, "test", "refs/pr/3")),
        ("org/prefs:en@0123abc:validation", ("org/prefs", "en", "validation", "0123abc")),
    ],
)
def test_hub_dataset_config_revision_and_split(monkeypatch, spec, expected):
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, *, split, revision=None):
        calls.append((name, config, split, revision))
        return [pair(), pair(chosen="")]

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(LoraArithError, match=rf"^{re.escape(spec)}:2: field 'chosen' must be a non-empty string$"):
        load_pairs([spec])
    assert calls == [expected] and spec_file(spec) is None


# ---- TRL's preference formats ------------------------------------------------------------------


def turn(role, content):
    return {"role": role, "content": content}


def test_trl_conversational_and_implicit_prompt_rows(tmp_path):
    explicit = {"prompt": [turn("user", "Sky?")], "chosen": [turn("assistant", "Blue.")], "rejected": [turn("assistant", "Green.")]}
    implicit = {
        "chosen": [turn("system", "Be brief."), turn("user", "Sky?"), turn("assistant", "Blue.")],
        "rejected": [turn("system", "Be brief."), turn("user", "Sky?"), turn("assistant", "Green.")],
    }
    implicit_text = {"chosen": "Q: What colour is the sky? A: blue", "rejected": "Q: What colour is the sky? A: green"}
    string_prompt = {"prompt": "Sky?", "chosen": [turn("assistant", "Blue.")], "rejected": [turn("assistant", "Grey.")]}
    path = write_jsonl(tmp_path / "trl.jsonl", [explicit, implicit, implicit_text, string_prompt])
    pairs, report = load_pairs([path])
    assert pairs == [
        PreferencePair([turn("user", "Sky?")], "Blue.", "Green.", f"{path}:1"),
        PreferencePair([turn("system", "Be brief."), turn("user", "Sky?")], "Blue.", "Green.", f"{path}:2"),
        PreferencePair("Q: What colour is the sky? A:", " blue", " green", f"{path}:3"),
        PreferencePair([turn("user", "Sky?")], "Blue.", "Grey.", f"{path}:4"),
    ]


TRL_BAD_ROWS = {
    "two assistant turns": (
        {"prompt": [turn("user", "x")], "chosen": [turn("assistant", "a"), turn("assistant", "b")], "rejected": [turn("assistant", "c")]},
        "'chosen' must be one assistant message after the prompt",
    ),
    "no shared prompt": (
        {"chosen": [turn("user", "x"), turn("assistant", "a")], "rejected": [turn("user", "y"), turn("assistant", "b")]},
        "share no leading turns",
    ),
    "one side conversational": (
        {"prompt": "x", "chosen": [turn("assistant", "a")], "rejected": "b"},
        "must both be non-empty message lists",
    ),
    "same reply": (
        {"prompt": [turn("user", "x")], "chosen": [turn("assistant", "a")], "rejected": [turn("assistant", "a")]},
        "same text",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(TRL_BAD_ROWS))
def test_bad_trl_row_names_file_and_line(tmp_path, case):
    row, reason = TRL_BAD_ROWS[case]
    path = write_jsonl(tmp_path / "bad.jsonl", [pair(), row])
    with pytest.raises(LoraArithError) as error:
        load_pairs([path])
    assert str(error.value).startswith(f"{path}:2: ") and reason in str(error.value)


def test_hub_dataset_failure_is_a_clear_error(monkeypatch):
    import datasets

    def failing_load_dataset(name, config=None, *, split, revision=None):
        raise ConnectionError("no route to host\nlong traceback text")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", failing_load_dataset)
    with pytest.raises(LoraArithError, match=r"^cannot load Hub dataset 'someone/pairs': no route to host$"):
        load_pairs(["someone/pairs"])


def test_hub_dataset_refused_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LoraArithError, match="Hub is offline"):
        load_pairs(["someone/pairs"])


# ---- helpers ---------------------------------------------------------------------------------


def test_to_messages():
    assert to_messages("Hi") == [{"role": "user", "content": "Hi"}]
    assert to_messages(CHAT_PROMPT) == CHAT_PROMPT
    with pytest.raises(ValueError, match="user turn"):
        to_messages(CHAT_PROMPT[:2])


def test_spec_file(tmp_path):
    path = tmp_path / "x.jsonl"
    assert spec_file(str(path)) == path
    assert spec_file(f"refusal:{path}") == path
