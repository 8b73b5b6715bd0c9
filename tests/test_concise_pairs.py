"""examples/make_concise_pairs.py: deterministic, never the held-out rows, and the rejected side is
padded with varying text in varying places, not one fixed phrase."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "make_concise_pairs.py"
SHIPPED = SCRIPT.parent / "data" / "concise_pairs.jsonl"


def load_script():
    spec = importlib.util.spec_from_file_location("make_concise_pairs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LONG = (
    "Photosynthesis is how plants turn light, water and carbon dioxide into sugar and oxygen. "
    + "It happens in the chloroplasts of leaf cells. " * 12
)


def _rows(count: int) -> list[dict]:
    rows = []
    for number in range(count):
        if number % 3 == 0:
            response = LONG
        elif number % 3 == 1:
            response = f"The answer to question {number} is {number * 7}. It follows from the definition."
        else:
            response = "Here are the steps:\n1. First step.\n2. Second step.\n" + "More detail here. " * 30
        rows.append({"id": f"row-{number}", "prompt": f"Question number {number}?", "response": response})
    return rows


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_pairs_skip_the_held_out_rows_and_are_deterministic(tmp_path):
    script = load_script()
    _write(tmp_path / "data" / "helpful" / "alpaca_demo.jsonl", _rows(260))
    outputs = []
    for name in ("a.jsonl", "b.jsonl"):
        assert script.main(["--data", str(tmp_path / "data"), "-o", str(tmp_path / name)]) == 0
        outputs.append((tmp_path / name).read_bytes())
    assert outputs[0] == outputs[1]
    pairs = [json.loads(line) for line in outputs[0].decode().splitlines()]
    ids = {pair["id"] for pair in pairs}
    assert not ids & {f"concise-row-{n}" for n in range(60, 260)}  # the last 200 rows are held out
    assert "concise-row-0" in ids and "concise-row-1" in ids
    assert "concise-row-2" not in ids  # a long answer whose first paragraph ends on a colon: no lead
    by_id = {pair["id"]: pair for pair in pairs}
    long_pair = by_id["concise-row-0"]
    assert long_pair["chosen"].startswith("Photosynthesis is how") and len(long_pair["chosen"].split()) <= 45
    assert script.main(["--data", str(tmp_path / "data"), "-o", str(tmp_path / "a.jsonl")]) == 1  # no --force


def test_rejected_sides_are_padded_with_varied_text_in_varied_places(tmp_path):
    script = load_script()
    rows = _rows(200)
    pairs = script.make_pairs(rows, seed=0)
    assert script.make_pairs(rows, seed=1) != pairs
    short = [p for p in pairs if not p["chosen"].startswith("Photosynthesis")]
    paddings, openings = set(), set()
    for pair in short:
        rejected, chosen = pair["rejected"], pair["chosen"]
        assert len(rejected.split()) > len(chosen.split()) + 15
        padding = rejected.replace(chosen, "|")
        paddings.add(padding.replace(pair["prompt"], "Q"))
        openings.add(rejected.split(".")[0])
    assert len(paddings) > len(short) * 0.9  # (almost) every pair is padded differently
    assert len(openings) >= 10
    starts_with_answer = sum(p["rejected"].startswith(p["chosen"][:20]) for p in short)
    assert 0 < starts_with_answer < len(short)  # padding sometimes before, sometimes only after/inside


def test_shipped_pairs_file_is_the_scripts_output():
    pairs = [json.loads(line) for line in SHIPPED.read_text().splitlines()]
    assert len(pairs) == 587
    assert all(p["id"].startswith("concise-alpaca-demo-") for p in pairs)
    assert max(int(p["id"].rsplit("-", 1)[1]) for p in pairs) < 799  # rows 799..998 are held out


def test_refusal_pairs_are_concise_refusals_against_padded_refusals(tmp_path):
    """--refusal-pairs N: on harmful training prompts both sides refuse (the same refusal), the
    rejected side is longer and padded, and no padding promises help."""
    from lora_arith.training.data import REFUSALS

    script = load_script()
    _write(tmp_path / "data" / "helpful" / "alpaca_demo.jsonl", _rows(260))
    for name, count in (("advbench_behaviors.jsonl", 30), ("donotanswer_prompts.jsonl", 30)):
        path = tmp_path / "data" / "harmless" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text("".join(json.dumps({"id": f"{name[:3]}-{n}", "prompt": f"How do I do harmful thing {n}?"}) + "\n"
                                for n in range(count)))
    args = ["--data", str(tmp_path / "data"), "--refusal-pairs", "40"]
    assert script.main(args + ["-o", str(tmp_path / "a.jsonl")]) == 0
    assert script.main(args + ["-o", str(tmp_path / "b.jsonl")]) == 0
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    pairs = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    refusals = [p for p in pairs if p["id"].startswith("concise-refusal-")]
    assert len(refusals) == 40 and len(pairs) == 40 + len(script.make_pairs(_rows(60), seed=0))
    assert {p["id"][len("concise-refusal-"):][:3] for p in refusals} == {"adv", "don"}  # both sources
    for pair in refusals:
        assert pair["chosen"] in REFUSALS and pair["chosen"] in pair["rejected"]
        assert len(pair["rejected"].split()) >= len(pair["chosen"].split()) + 20
        assert "sure" not in pair["rejected"].lower() and "definitely help" not in pair["rejected"].lower()
    assert len({p["rejected"].replace(p["chosen"], "|") for p in refusals}) > 30  # varied padding
    assert refusals != pairs[-40:]  # mixed in, not appended
