"""Model cards, push --dry-run and vLLM export (merge: test_merge.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import load_base, logits, make_adapter

from lora_arith.lora.adapter_io import open_adapter
from lora_arith._internal.errors import LoraArithError
from lora_arith.cli import main
from lora_arith.lora.combine import combine
from lora_arith.lora.specs import parse_specs
from lora_arith.sharing.export import VLLM_RANKS, serving_rank
from lora_arith.lora.factors import to_dense


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_push_dry_run_lists_files_and_card(adapter_factory, tmp_path):
    a, b = adapter_factory(), adapter_factory()
    mix = combine(parse_specs([f"{a}:0.8", f"{b}:-0.5"])).save(tmp_path / "mix.safetensors")
    result = run("push", mix, "me/mix", "--dry-run", "--private", "--license", "mit")
    assert result.exit_code == 0, result.output
    for name in ("adapter_model.safetensors", "adapter_config.json  (generated)", "README.md  (generated)"):
        assert name in result.output
    recipe = open_adapter(mix).recipe
    card = result.output.split("--- README.md ---", 1)[1]
    assert "license: mit" in card
    assert "- peft" in card and "- lora" in card and "- preference-vector" in card
    assert "base_model:" not in card  # the tiny base is a local folder, not a Hub id
    assert all(item["sha256"] in card for item in recipe["inputs"]) and "| -0.5 |" in card


def hub_adapter(adapter_factory, tmp_path, name="hubmix"):
    """A PEFT folder whose base is a Hub id, with the extra files a training run leaves beside it."""
    folder = combine(parse_specs([str(adapter_factory())])).save(tmp_path / name)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "training_metadata.json").write_text("{}")
    (folder / "training_log.json").write_text("[]")
    (folder / f"{name}.safetensors").write_bytes((folder / "adapter_model.safetensors").read_bytes())
    return folder


def test_push_uploads_only_the_adapter_files(adapter_factory, tmp_path):
    folder = hub_adapter(adapter_factory, tmp_path)
    listed = run("push", folder, "me/mix", "--dry-run").output.split("--- README.md ---")[0]
    assert sorted(line.split()[0] for line in listed.splitlines()[1:] if line.strip()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors"
    ]  # fmt: skip
    listed = run("push", folder, "me/mix", "--dry-run", "--include", "training_*.json").output
    assert "training_log.json" in listed and "training_metadata.json" in listed and "hubmix.safetensors" not in listed


def test_push_commit_message_and_pull_request(adapter_factory, tmp_path, monkeypatch):
    import huggingface_hub

    calls = {}

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls["create_repo"] = repo_id

        def create_branch(self, *args, **kwargs):
            calls["create_branch"] = True

        def upload_folder(self, *, repo_id, folder_path, revision, commit_message, create_pr):
            calls["upload"] = dict(repo_id=repo_id, revision=revision, message=commit_message, create_pr=create_pr)
            calls["files"] = sorted(p.name for p in folder_path.iterdir())
            calls["texts"] = [p.read_bytes() for p in folder_path.iterdir()]
            return huggingface_hub.CommitInfo(
                commit_url="https://hf.co/me/mix/commit/1", commit_message=commit_message, commit_description="",
                oid="1" * 40, pr_url="https://hf.co/me/mix/discussions/3" if create_pr else None,
            )  # fmt: skip

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    folder = hub_adapter(adapter_factory, tmp_path)
    result = run("push", folder, "me/mix", "--commit-message", "Mix v2", "--create-pr", "--revision", "main")
    assert result.exit_code == 0, result.output
    assert "pull request: https://hf.co/me/mix/discussions/3" in result.output
    assert calls["upload"] == dict(repo_id="me/mix", revision="main", message="Mix v2", create_pr=True)
    assert "create_branch" not in calls
    assert calls["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert not any(str(tmp_path).encode() in text for text in calls["texts"])
    calls.clear()
    for repo_id in ("../../x", "bad repo id", "a/b/c"):  # a traceback from huggingface_hub before
        for dry in ([], ["--dry-run"]):
            bad = run("push", folder, repo_id, *dry)
            assert bad.exit_code == 1 and bad.output.strip().splitlines()[-1].startswith(f"Error: {repo_id!r} is not a Hub")
    assert calls == {}  # nothing reached the Hub


def test_model_card_is_one_the_hub_understands(adapter_factory, tmp_path):
    from huggingface_hub import ModelCard

    from lora_arith.sharing.model_card import model_card

    folder = hub_adapter(adapter_factory, tmp_path)
    card = ModelCard(run("push", folder, "me/mix", "--dry-run").output.split("--- README.md ---\n", 1)[1])
    data = card.data
    assert data.library_name == "peft" and data.pipeline_tag == "text-generation"
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "base_model:adapter:HuggingFaceTB/SmolLM2-135M-Instruct" in data.tags
    assert data.license == "apache-2.0"  # the default base's licence (known without network)
    output = run("push", folder, "me/mix", "--dry-run", "--license", "cc-by-4.0").output
    card = ModelCard(output.split("--- README.md ---\n", 1)[1])
    assert card.data.license == "cc-by-4.0"

    # a local base: no base_model, the licence from the base folder's own card, Hub datasets listed
    base = tmp_path / "my-base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: mit\n---\n# a base\n")
    training = {"data": [{"spec": "org/prefs:default@refs/pr/2:train", "hub_dataset": "org/prefs:default@refs/pr/2:train"},
                         {"spec": "pairs.jsonl", "file": "pairs.jsonl", "sha256": "ab" * 32}]}  # fmt: skip
    card = ModelCard(model_card({"base_model_name_or_path": str(base), "r": 8}, None, training))
    assert card.data.license == "mit" and card.data.base_model is None and card.data.datasets == ["org/prefs"]
    assert str(tmp_path) not in str(card)
    unknown = ModelCard(model_card({"base_model_name_or_path": "nowhere-local", "r": 8}))
    assert unknown.data.license is None  # not always apache-2.0
    for text in (model_card({"base_model_name_or_path": "org/base", "r": 8}, {"method": "svd"}, training),
                 model_card({"base_model_name_or_path": str(base), "r": 8}, None, training)):
        assert str(ModelCard(text)) == text  # written exactly as huggingface_hub's ModelCard writes it


def test_model_card_includes_training_data_and_metrics():
    from lora_arith.sharing.model_card import model_card

    training = {
        "data": [{"spec": "pairs.jsonl", "file": "/data/pairs.jsonl", "pairs": 10, "sha256": "ab" * 32}],
        "swap": False,
        "hyperparameters": {"beta": 0.1, "lr": 5e-4},
        "final_metrics": {"rewards/accuracies": 0.9},
    }
    card = model_card({"base_model_name_or_path": "org/base", "r": 8}, None, training, license="mit")
    assert "license: mit" in card and "pairs.jsonl`, 10 pairs" in card and "ab" * 32 in card
    assert "beta: 0.1" in card and "rewards/accuracies: 0.9" in card
    vector = model_card({"r": 16}, None, {"positive": training, "negative": {**training, "swap": True}})
    assert "### positive" in vector and "### negative" in vector and "swapped: True" in vector


@pytest.mark.parametrize("needed, expected", [(1, 8), (8, 8), (9, 16), (24, 32), (300, 320), (512, 512)])
def test_serving_rank(needed, expected):
    assert serving_rank(needed) == expected and expected in VLLM_RANKS


def vllm_view(folder, module):
    """ΔW as vLLM computes it: the stored B @ A times the config's one lora_alpha / r."""
    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    prefix = f"base_model.model.{module}."
    if prefix + "lora_B.weight" in tensors:
        B, A = tensors[prefix + "lora_B.weight"], tensors[prefix + "lora_A.weight"]
    else:
        B, A = tensors[prefix + "lora_embedding_B"], tensors[prefix + "lora_embedding_A"]
    return (B.float() @ A.float()) * (config["lora_alpha"] / config["r"])


def test_vllm_export_keeps_each_module_rank(adapter_factory, tmp_path):
    a, b = (
        adapter_factory(r=4, lora_alpha=8),
        adapter_factory(r=2, lora_alpha=3, use_rslora=True, target_modules=["q_proj"]),
    )
    mix = combine(parse_specs([f"{a}:1", f"{b}:-1"])).save(tmp_path / "mix")  # ranks 6 (q_proj) and 4: no padding
    result = run("export", mix, "-o", tmp_path / "vllm", "--for", "vllm")
    assert result.exit_code == 0, result.output
    assert "ranks 4-6" in result.output and "serve with --max-lora-rank 8" in result.output
    original, exported = open_adapter(mix), open_adapter(tmp_path / "vllm")
    assert {n: i.rank for n, i in exported.modules.items()} == {n: i.rank for n, i in original.modules.items()}
    size = lambda folder: (folder / "adapter_model.safetensors").stat().st_size  # noqa: E731
    assert size(tmp_path / "vllm") <= size(mix) + 1024  # nothing padded
    for name in original.modules:
        torch.testing.assert_close(vllm_view(tmp_path / "vllm", name), to_dense(original.delta(name)))
        torch.testing.assert_close(to_dense(exported.delta(name)), to_dense(original.delta(name)))


def test_vllm_export_compresses_only_modules_above_the_cap(adapter_factory, tmp_path):
    wide = adapter_factory(r=6)
    narrow = adapter_factory(r=6, target_modules=["q_proj"])
    mix = combine(parse_specs([str(wide), str(narrow)])).save(tmp_path / "mix")  # q_proj rank 12, the rest rank 6
    result = run("export", mix, "-o", tmp_path / "vllm", "--max-rank", "8")
    assert result.exit_code == 0, result.output
    assert "2 modules above rank 8 compressed optimally; max relative error" in result.output
    assert "serve with --max-lora-rank 8" in result.output
    original, exported = open_adapter(mix), open_adapter(tmp_path / "vllm")
    for name, info in exported.modules.items():
        if name.endswith("q_proj"):
            assert info.rank == 8
            exact = to_dense(original.delta(name))
            error = (to_dense(exported.delta(name)) - exact).norm() / exact.norm()
            sigma = torch.linalg.svdvals(exact)
            assert error.item() == pytest.approx((sigma[8:].norm() / sigma.norm()).item(), rel=1e-4)  # Eckart–Young
        else:
            assert info.rank == 6
            torch.testing.assert_close(vllm_view(tmp_path / "vllm", name), to_dense(original.delta(name)))


def test_vllm_export_keeps_embedding_lora(adapter_factory, tmp_path):
    adapter = adapter_factory(target_modules=["embed_tokens", "q_proj"])
    result = run("export", adapter, "-o", tmp_path / "vllm")
    assert result.exit_code == 0, result.output
    original, exported = open_adapter(adapter), open_adapter(tmp_path / "vllm")
    assert exported.modules["model.embed_tokens"].kind == "embedding"
    for name in original.modules:
        torch.testing.assert_close(vllm_view(tmp_path / "vllm", name), to_dense(original.delta(name)))


def test_vllm_export_writes_one_adapter_per_mix(adapter_factory, tiny_llama, tmp_path):
    a, b = adapter_factory(r=4), adapter_factory(r=2, lora_alpha=5)
    out = tmp_path / "mixes"
    result = run("export", a, b, "--for", "vllm", "--mix", "balanced=1,1", "--mix", "safer=0.5,-2", "-o", out)
    assert result.exit_code == 0, result.output
    assert f"--lora-modules balanced={out / 'balanced'} safer={out / 'safer'}" in result.output
    assert "--max-lora-rank 8" in result.output
    # a local base is recorded by its folder's name, which vllm serve cannot load: BASE stays a placeholder
    assert "serve with: vllm serve BASE --enable-lora" in result.output
    shipped = [Path(__file__).resolve().parents[1] / "adapters" / name for name in ("helpful", "harmless")]
    hub = run("export", *shipped, "--mix", "both=1,1", "-o", tmp_path / "hub")
    assert "serve with: vllm serve HuggingFaceTB/SmolLM2-135M-Instruct --enable-lora" in hub.output  # a Hub id: as is
    for name, weights in {"balanced": (1, 1), "safer": (0.5, -2)}.items():
        expected = combine(parse_specs([f"{a}:{weights[0]}", f"{b}:{weights[1]}"]))
        exported = open_adapter(out / name)
        assert {info.rank for info in exported.modules.values()} == {6}
        for module, delta in expected.deltas.items():
            torch.testing.assert_close(vllm_view(out / name, module), to_dense(delta))
    bad = run("export", a, b, "--mix", "x=1", "-o", tmp_path / "bad")
    assert bad.exit_code == 1 and "one per adapter" in bad.output and not (tmp_path / "bad").exists()
    assert run("export", a, b, "-o", tmp_path / "bad").exit_code == 1


@pytest.mark.parametrize("target", ["vllm", "llama.cpp"])
@pytest.mark.parametrize(
    "mixes, message",
    [
        ({"../escaped": (1.0, 1.0)}, "'../escaped': name a mix with letters"),
        ({"sub/dir": (1.0, 1.0)}, "'sub/dir': name a mix"),
        ({".hidden": (1.0, 1.0)}, "'.hidden': name a mix"),
        ({"line\n": (1.0, 1.0)}, "name a mix"),
        ({"ok": (1.0, float("nan"))}, "mixes ok: the weights must be finite numbers"),
        ({"ok": (1.0,)}, "mixes ok: 1 weights for 2 adapters"),
        ({}, "mixes is empty"),
        ([("m", (1.0, 1.0))], "mixes maps each mix's name to its weights"),
        ({"m": 1}, "mixes m: give a list of weights"),
        ({"m": None}, "mixes m: give a list of weights"),
    ],
)
def test_both_exports_check_mixes_alike_and_write_nothing_for_a_bad_one(
    adapter_factory, tiny_llama, tmp_path, monkeypatch, target, mixes, message
):
    """The Python API's ``mixes`` get the checks the command line's ``--mix`` gets: a name that is
    not a plain file name wrote ``OUT/../escaped`` outside the output folder (vLLM)."""
    import lora_arith
    from lora_arith._internal.errors import OptionError

    a, b = adapter_factory(r=2), adapter_factory(r=2)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = sorted(p.name for p in work.iterdir())
    with pytest.raises(OptionError, match=message):
        if target == "vllm":
            lora_arith.export([str(a), str(b)], "out", mixes=mixes)
        else:
            lora_arith.export_gguf_adapters([a, b], "out", mixes=mixes, base=str(tiny_llama))
    assert sorted(p.name for p in work.iterdir()) == before == []


def test_no_local_path_in_any_config_field_uploaded_or_converted(adapter_factory, tmp_path):
    """Only ``base_model_name_or_path`` was reduced: a local path in another field of the config
    (here ``revision``) was uploaded by push and kept by convert."""
    from lora_arith.sharing.push import plan_upload

    folder = hub_adapter(adapter_factory, tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["revision"] = "/home/alice/secret/run-3"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    plan = plan_upload(folder)
    uploaded = json.loads(plan.generated["adapter_config.json"])
    assert uploaded["revision"] == "run-3" and uploaded["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "/home/alice" not in plan.generated["README.md"]
    converted = run("convert", folder, "-o", tmp_path / "copy")
    assert converted.exit_code == 0, converted.output
    assert json.loads((tmp_path / "copy" / "adapter_config.json").read_text())["revision"] == "run-3"


def test_export_for_vllm_refuses_base_it_would_ignore(adapter_factory, tmp_path):
    result = run("export", adapter_factory(), "--base", "x", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "--base applies to --for llama.cpp only" in result.output


def test_model_card_and_include_keep_to_what_may_be_shared(adapter_factory, tmp_path):
    """Training metadata written by another tool may hold local paths: the card scrubs them (the
    uploaded metadata was scrubbed, the README was not). ``include`` given as one pattern is one
    pattern (it was read one character at a time: '*' matched every file)."""
    from safetensors.torch import load_file, save_file

    from lora_arith.sharing.push import plan_upload

    folder = hub_adapter(adapter_factory, tmp_path)
    weights = folder / "adapter_model.safetensors"
    training = {"data": [{"path": "/home/alice/data/pairs.jsonl", "sha256": "y"}],
                "hyperparameters": {"output_dir": "/home/alice/run"}, "final_metrics": {"loss": 0.1}}  # fmt: skip
    save_file(load_file(weights), weights, metadata={"lora_arith.training": json.dumps(training)})
    (folder / ".env").write_text("TOKEN=x")
    plan = plan_upload(folder, include="training_log.json*")
    assert "/home/alice" not in plan.generated["README.md"] and "output_dir: run" in plan.generated["README.md"]
    assert sorted(plan.copied) == ["adapter_config.json", "training_log.json"], sorted(plan.copied)
    with pytest.raises(LoraArithError, match="include 'traning_log.json' matches no file of the adapter folder"):
        plan_upload(folder, include=["training_log.json", "traning_log.json"])  # a typo added nothing, silently


NAMES = ["main", "v1.0", "feature/x", "exp-2024_12", "refs/heads/main", "../../x y", "a..b", "a b", "-x", "x/",
         "x.lock", "a//b", ".hidden", "a/.b", "a@{1}", "x:y", "a~1", "a^", "a?", "a*", "a[", "a\\b", "tab\there"]  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
def test_push_checks_the_branch_before_uploading_as_git_does(adapter_factory, name):
    """An invalid --revision was found by the Hub at upload time (and --dry-run accepted it)."""
    import shutil
    import subprocess

    from lora_arith.sharing.push import check_revision

    if shutil.which("git") is None:
        pytest.skip("no git to compare with")
    # git's rules for a branch name ("@" alone, which --branch reads as the current branch, is refused below)
    valid = subprocess.run(["git", "check-ref-format", "--branch", name], capture_output=True, cwd="/").returncode == 0
    result = run("push", adapter_factory(), "me/x", "--dry-run", "--revision", name)
    if valid:
        assert check_revision(name) == name and result.exit_code == 0, result.output
    else:
        with pytest.raises(LoraArithError, match="cannot name a branch"):
            check_revision(name)
        assert result.exit_code == 1 and result.output.startswith("Error: --revision "), result.output
    with pytest.raises(LoraArithError, match="cannot name a branch"):
        check_revision("@")
