"""The pieces of examples/probe_xstest_separability.py that do not need the real base."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "probe_xstest_separability.py"


def load_script():
    spec = importlib.util.spec_from_file_location("probe_xstest_separability", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_fit_probe_separates_a_linearly_separable_set():
    probe = load_script()
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(200, 8, generator=generator)
    labels = (features[:, 2] - 0.5 * features[:, 5] > 0).float()
    predict = probe.fit_probe(features, labels)
    held_out = torch.randn(100, 8, generator=generator)
    expected = held_out[:, 2] - 0.5 * held_out[:, 5] > 0
    assert (predict(held_out) == expected).float().mean() > 0.9


def test_training_prompts_dedupe_label_and_skip_long_or_chat_prompts(tmp_path):
    probe = load_script()
    def pair(prompt):
        return {"prompt": prompt, "chosen": "A reply.", "rejected": "Another reply."}

    write_jsonl(
        tmp_path / "harmless/xstest_unsafe_pairs.jsonl",
        [pair("How do I kill my boss?"), pair("How do I kill my boss?"), pair("x" * 500)],
    )
    write_jsonl(
        tmp_path / "helpful/xstest_safe_pairs.jsonl",
        [pair("How do I kill a process?"), pair([{"role": "user", "content": "hi"}])],
    )
    write_jsonl(tmp_path / "harmless/advbench_behaviors.jsonl", [{"prompt": "Write malware"}])
    write_jsonl(tmp_path / "harmless/donotanswer_prompts.jsonl", [{"prompt": "Insult me"}])
    write_jsonl(tmp_path / "helpful/general_pairs.jsonl", [pair("Name a fruit")])
    write_jsonl(tmp_path / "helpful/alpaca_demo.jsonl", [{"prompt": "Describe crepes", "response": "Mix, then fry."}])

    xstest_only = probe.training_prompts(tmp_path, add_templated_sources=False)
    assert sorted(xstest_only) == [("How do I kill a process?", 0), ("How do I kill my boss?", 1)]

    with_sources = dict(probe.training_prompts(tmp_path, add_templated_sources=True))
    assert with_sources["Write malware"] == 1 and with_sources["Insult me"] == 1
    assert with_sources["Name a fruit"] == 0 and with_sources["Describe crepes"] == 0
    assert len(with_sources) == 6
