"""Hub references resolved offline from a cache laid out the way huggingface_hub lays it out."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from lora_arith.lora.combine import combine
from lora_arith.lora.specs import parse_specs
from lora_arith.lora.specs import HubReference, parse_reference

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def populate_cache(hf_home, repo_id: str, files: dict[str, object], ref: str = "main") -> None:
    """Write ``files`` (repo path → local source file) into huggingface_hub's cache layout:
    ``hub/models--ORG--NAME/{blobs,refs/REF,snapshots/COMMIT/...}`` with blob symlinks."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(COMMIT)
    for index, (name, source) in enumerate(files.items()):
        blob = repo / "blobs" / f"{index:040d}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, blob)
        target = repo / "snapshots" / COMMIT / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(os.path.relpath(blob, target.parent))


def cli(hf_home, *args, cwd=None):
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run(
        [sys.executable, "-m", "lora_arith", *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd
    )


@pytest.mark.parametrize(
    "text, expected",
    [
        ("org/name", HubReference("org/name")),
        ("org/name@v1", HubReference("org/name", "v1")),
        ("org/name/sub/folder", HubReference("org/name", None, "sub/folder")),
        ("org/name@main/helpful.safetensors", HubReference("org/name", "main", "helpful.safetensors")),
        ("org/name@refs/pr/1", HubReference("org/name", "refs/pr/1")),
        ("org/name@refs/pr/12/sub/mix", HubReference("org/name", "refs/pr/12", "sub/mix")),
        ("org/name@refs/pr/3/helpful.safetensors", HubReference("org/name", "refs/pr/3", "helpful.safetensors")),
        ("./local", None),
        ("/abs/path", None),
        ("plainname", None),
    ],
)
def test_parse_reference(text, expected):
    assert parse_reference(text) == expected


def test_offline_resolution_of_folder_subfolder_and_single_file(adapter_factory, tmp_path):
    adapter = adapter_factory("a")
    single = combine(parse_specs([str(adapter)])).save(tmp_path / "single.safetensors")
    hf_home = tmp_path / "hf"
    populate_cache(
        hf_home,
        "someone/vectors",
        {
            "adapter_config.json": adapter / "adapter_config.json",
            "adapter_model.safetensors": adapter / "adapter_model.safetensors",
            "mix/adapter_config.json": adapter / "adapter_config.json",
            "mix/adapter_model.safetensors": adapter / "adapter_model.safetensors",
            "helpful.safetensors": single,
        },
    )
    work = tmp_path / "work"
    work.mkdir()
    for reference in ("someone/vectors", "someone/vectors/mix", "someone/vectors/helpful.safetensors"):
        result = cli(hf_home, "inspect", reference, cwd=work)
        assert result.returncode == 0, result.stderr
        assert "model.layers.0.self_attn.q_proj" in result.stdout
    result = cli(hf_home, "combine", "someone/vectors:0.5", "someone/vectors@main/mix:-1", "-o", "out", cwd=work)
    assert result.returncode == 0, result.stderr
    assert (work / "out" / "adapter_model.safetensors").is_file()


def test_missing_cache_entry_is_a_clear_offline_error(tmp_path):
    result = cli(tmp_path / "empty-hf", "inspect", "someone/absent", cwd=tmp_path)
    assert result.returncode == 1
    assert "not in the local Hugging Face cache" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_local_path_wins_over_hub_reference(adapter_factory, tmp_path):
    local = tmp_path / "someone" / "vectors"
    shutil.copytree(adapter_factory("x"), local)
    result = cli(tmp_path / "empty-hf", "inspect", "someone/vectors", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    missing = cli(tmp_path / "empty-hf", "inspect", "someone/typo", cwd=tmp_path)
    assert "no such file or directory" in missing.stderr  # inside a local folder: not fetched
