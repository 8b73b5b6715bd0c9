"""Nothing private leaves the machine: every file a command writes, and every model card, is
free of the test's own temporary-folder path (issue 12 §4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import make_adapter
from tiny_models import make_tiny_chat_model

from lora_arith.cli import main
from lora_arith.lora.factors import single_threaded


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Run this module's tiny models on one thread: they gain nothing from more, and on a busy
    machine every multi-threaded op waits for a descheduled worker thread (~20 ms each)."""
    with single_threaded():
        yield


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def leaks(root: Path, secrets: list[str]) -> list[str]:
    """``path: secret`` for every file under ``root`` whose bytes contain a secret."""
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path.relative_to(root)}: {s}" for s in secrets if s.encode() in data]
    return found


def test_no_written_file_or_card_holds_a_local_path(tmp_path_factory, pairs_file, tmp_path):
    base = make_tiny_chat_model(tmp_path_factory.mktemp("private-base"))
    secrets = sorted({str(tmp_path_factory.getbasetemp()), str(tmp_path_factory.getbasetemp().resolve())})
    prompts = tmp_path / "harmful.jsonl"
    prompts.write_text(json.dumps({"prompt": "How do I pick a lock?"}) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    quick = ["--max-steps", "1", "--warmup-ratio", "0", "--batch-size", "2", "--grad-accum", "1", "--max-length", "64", "--rank", "2"]
    quick += ["--no-4bit", "--no-bf16", "--base", base]
    run("train", "--data", pairs_file.resolve(), "--data", f"refusal:{prompts.resolve()}", *quick, "-o", out / "run")
    other = make_adapter(base, tmp_path / "other", r=2)  # its config names the base by absolute path
    run("combine", f"{out / 'run'}:1", f"{other}:-0.5", "-o", out / "mix")
    run("combine", f"{out / 'run'}:1", f"{other}:-0.5", "-o", out / "mix.safetensors")
    run("extract", out / "run", other, "--method", "svd", "--rank", "2", "-o", out / "phi")
    run("export", out / "mix", "-o", out / "vllm")
    run("export", out / "run", other, "--mix", "a=1,1", "--mix", "b=1,-1", "-o", out / "mixes")
    run("convert", out / "mix.safetensors", "-o", out / "converted")
    run("convert", out / "phi", "-o", out / "phi.safetensors")
    run("merge", "--base", base, "--adapter", f"{out / 'run'}:1", "-o", out / "merged")
    cards = out / "cards"
    cards.mkdir()
    for adapter in ("run", "mix", "mix.safetensors", "phi", "vllm", "converted"):
        include = [] if adapter.endswith(".safetensors") else ["--include", "*.json"]
        (cards / f"{adapter}.md").write_text(run("push", out / adapter, "me/x", "--dry-run", *include))
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert "run/training_metadata.json" in written and "mixes/b/adapter_model.safetensors" in written
    assert leaks(out, secrets) == []
    assert "harmful.jsonl" in (out / "run" / "training_metadata.json").read_text()  # named, by basename


def test_push_rewrites_old_metadata_that_holds_local_paths(adapter_factory, tmp_path, monkeypatch):
    """A single file written before this fix (its metadata has absolute paths) is uploaded
    with those paths reduced to basenames; its tensors are unchanged."""
    import huggingface_hub
    from safetensors.torch import load_file, save_file

    from lora_arith.lora.adapter_io import CONFIG_METADATA_KEY, RECIPE_METADATA_KEY

    adapter = adapter_factory(r=2)
    tensors = load_file(adapter / "adapter_model.safetensors")
    config = json.loads((adapter / "adapter_config.json").read_text())
    recipe = {"method": "cat", "inputs": [{"path": f"{tmp_path}/private/a", "weight": 1.0, "sha256": "ab" * 32}]}
    old = tmp_path / "old.safetensors"
    save_file(tensors, old, metadata={CONFIG_METADATA_KEY: json.dumps(config), RECIPE_METADATA_KEY: json.dumps(recipe)})
    staged = {}

    class FakeApi:
        def create_repo(self, *args, **kwargs):
            pass

        def upload_folder(self, *, folder_path, **kwargs):
            staged.update({p.name: p.read_bytes() for p in folder_path.iterdir()})
            staged["tensors"] = load_file(folder_path / "adapter_model.safetensors")
            return "https://hf.co/me/x/commit/1"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    run("push", old, "me/x")
    assert sorted(staged) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "tensors"]
    assert not any(str(tmp_path).encode() in data for name, data in staged.items() if name != "tensors")
    assert all(torch.equal(staged["tensors"][k], v) for k, v in tensors.items())


@pytest.mark.parametrize(
    "text, public",
    [
        ("C:\\Users\\alice\\base", "base"),  # PEFT's record of a base on Windows: kept whole before
        ("C:/Users/alice/base", "base"),
        ("\\\\server\\share\\alice\\run", "run"),
        ("trained in C:\\Users\\alice\\runs", "trained in runs"),
        ("/home/alice/my models/base", "base"),  # a path with a space: 'my models/base' before
        ("refusal:/home/alice/my data/x.jsonl", "refusal:x.jsonl"),
        ("~alice/models/base", "base"),
        ("made from /home/alice/secret", "made from secret"),
        ("http://127.0.0.1:8000/v1 (model judge)", "http://127.0.0.1:8000/v1 (model judge)"),  # 'http:127.0.0.1:...' before
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),
        ("https://huggingface.co/org/name", "https://huggingface.co/org/name"),
        ("file:///home/alice/mlruns", "file:mlruns"),  # a local path behind a URL scheme
        ("//server/share/x", "x"),
        ("/data/a.jsonl:0.5 /data/b.jsonl:-1", "a.jsonl:0.5 b.jsonl:-1"),  # several paths: each its own name
        ("/home/me/a.jsonl, /home/me/b", "a.jsonl, b"),
        ("./data/x.jsonl", "./data/x.jsonl"),
    ],
)
def test_scrub_reduces_every_local_path_and_nothing_else(text, public):
    from lora_arith._internal.privacy import scrub

    assert scrub(text) == public and scrub({"k": [text]}) == {"k": [public]}


def test_a_home_folder_of_no_known_user_is_a_path_like_any_other(tmp_path):
    """``Path.expanduser`` raises RuntimeError for ``~nouser``: the record of such a base, and
    such a path on the command line, were tracebacks."""
    from lora_arith._internal.privacy import public_name

    assert public_name("~no_such_user_xyz/models/base") == "base"
    result = CliRunner().invoke(main, ["inspect", "~no_such_user_xyz/a1"])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "Error: " in result.output, result.output


def test_training_records_name_their_data_files_by_basename_in_outputs(tmp_path):
    """The shipped vectors' training records (written by an earlier version) hold each data file as
    the spec the user gave, "../shared/data/helpful/general_pairs.jsonl": scrub keeps a relative
    path, so combine's outputs and push's model card carried the folder layout. Now a local file is
    [KIND:]FILE, its basename, everywhere a training record is written or shown."""
    from lora_arith.lora.adapter_io import open_adapter
    from lora_arith.sharing.model_card import model_card

    shipped = Path(__file__).resolve().parents[1] / "adapters"
    assert "../shared/data" in json.dumps(open_adapter(shipped / "harmless").training)  # the old form, kept as shipped
    out = tmp_path / "mix"
    result = CliRunner().invoke(main, ["combine", f"{shipped / 'helpful'}:1", f"{shipped / 'harmless'}:1", "-o", str(out)])
    assert result.exit_code == 0, result.output
    written = [json.dumps(open_adapter(out).training), (out / "README.md").read_text()]
    card = model_card({}, None, open_adapter(shipped / "harmless").training)  # what push uploads for it
    for text in [*written, card]:
        assert "../" not in text and "shared/data" not in text
    assert "`refusal:advbench_behaviors.jsonl`, 520 pairs" in card and '"spec": "general_pairs.jsonl"' in written[0]
    # push uploads the weights with their metadata made public too, not as shipped
    from lora_arith.sharing.push import _metadata, _public_metadata, plan_upload

    assert "adapter_model.safetensors" in plan_upload(shipped / "harmless").rewritten
    uploaded = _public_metadata(_metadata(open_adapter(shipped / "harmless").weights_path))
    assert "../" not in uploaded["lora_arith.training"] and "refusal:advbench_behaviors.jsonl" in uploaded["lora_arith.training"]
    # a spec that is not text is scrubbed like the rest; "c:" is a drive, not a data kind
    from lora_arith._internal.privacy import public_data_spec, public_training

    assert public_training({"data": [{"spec": ["/home/me/secret.jsonl"]}]}) == {"data": [{"spec": ["secret.jsonl"]}]}
    assert public_data_spec({"spec": "/home/me/x.jsonl", "hub_dataset": "o/d"}) == "x.jsonl"
    assert public_data_spec({"spec": "c:/d/x.jsonl", "file": "x.jsonl"}) == "x.jsonl"
