"""Output-path safety (issue 11 §1, §2, §5, §6, §7's output cases), output file modes (issue 12 §2)
and one flag vocabulary (issue 12 §8)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from lora_arith._internal import atomic
from lora_arith.cli import main
from lora_arith.lora.combine import combine
from lora_arith.lora.specs import parse_specs
from lora_arith._internal.errors import LoraArithError

REPO = Path(__file__).resolve().parents[1]


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_user_error(result, *fragments: str) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def tree_digest(path: Path) -> str:
    """A digest of every file's name and bytes under ``path`` (or of the file itself)."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(path.parent)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def leftovers(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if "lora-arith-" in p.name or p.name.endswith(".tmp"))


def cli(*args: object, dont_write_bytecode: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """The real command line in a subprocess (it imports lora_arith from this checkout)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    if dont_write_bytecode:  # a .pyc written under a small file-size limit would not be our write
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "lora_arith", *map(str, args)], capture_output=True, text=True, env=env, **kwargs
    )


def python(code: str, *args: object, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kwargs,
    )


@pytest.fixture
def base_copy(chat_base, tmp_path) -> Path:
    """A private copy of the tiny chat base, so a test that fails cannot damage the shared one."""
    return Path(shutil.copytree(chat_base, tmp_path / "BASE"))


@pytest.fixture
def chat_adapter(base_copy, tmp_path) -> Path:
    from helpers import make_adapter

    return make_adapter(base_copy, tmp_path / "chat-adapter", r=2, lora_alpha=4)


# -- §1: inputs are never modified, with or without --force -----------------------------------


@pytest.mark.parametrize(
    "target",
    ["A/adapter_model.safetensors", "A/adapter_config.json", "A", "A/new-folder", "."],
    ids=["weights", "config", "folder", "inside", "contains"],
)
@pytest.mark.parametrize("force", [True, False], ids=["force", "no-force"])
def test_combine_never_writes_over_or_into_an_input(adapter_factory, tmp_path, target, force):
    a = adapter_factory("A")
    before = tree_digest(a)
    output = tmp_path / target if target != "." else tmp_path
    result = run("combine", f"{a}:2", "-o", output, *(["--force"] if force else []))
    assert_user_error(result, "input")
    assert tree_digest(a) == before and not leftovers(a) and not leftovers(tmp_path)


def test_input_weights_file_is_protected_with_its_folder(adapter_factory, tmp_path):
    a = adapter_factory("A")
    before = tree_digest(a)
    weights = a / "adapter_model.safetensors"
    assert_user_error(run("combine", weights, "-o", a / "adapter_config.json", "--force"), "input")
    assert_user_error(run("combine", weights, "-o", a / "card.md"), "inside an input")
    assert tree_digest(a) == before


def test_symlinks_to_inputs_are_resolved(adapter_factory, tmp_path):
    a = adapter_factory("A")
    before = tree_digest(a)
    (tmp_path / "link.safetensors").symlink_to(a / "adapter_model.safetensors")
    (tmp_path / "alias").symlink_to(a)
    assert_user_error(run("combine", a, "-o", tmp_path / "link.safetensors", "--force"), "input")
    assert_user_error(run("combine", a, "-o", tmp_path / "alias" / "x.safetensors"), "input")
    assert_user_error(run("combine", tmp_path / "alias", "-o", a, "--force"), "input")
    assert tree_digest(a) == before


def test_python_api_save_refuses_its_inputs(adapter_factory):
    a = adapter_factory("A")
    before = tree_digest(a)
    with pytest.raises(LoraArithError, match="input"):
        combine(parse_specs([f"{a}:2"])).save(a / "adapter_model.safetensors", force=True)
    assert tree_digest(a) == before


def test_export_onto_its_input_is_refused(adapter_factory):
    a = adapter_factory("A")
    before = tree_digest(a)
    assert_user_error(run("export", a, "-o", a, "--force"), "input")
    assert tree_digest(a) == before


@pytest.mark.parametrize("target", ["adapter", "base"])
def test_merge_onto_its_adapter_or_base_is_refused(base_copy, chat_adapter, target):
    destination = chat_adapter if target == "adapter" else base_copy
    before = tree_digest(destination)
    result = run("merge", "--base", base_copy, "--adapter", chat_adapter, "-o", destination, "--force")
    assert_user_error(result, "input")
    assert tree_digest(destination) == before


def test_generate_onto_its_prompts_file_is_refused(base_copy, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    result = run("generate", "--base", base_copy, "--prompts", prompts, "-o", prompts, "--force")
    assert_user_error(result, "input")
    assert prompts.read_text() == '{"prompt": "hi"}\n'


def test_eval_and_sweep_outputs_never_hold_their_data(base_copy, chat_adapter, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    prompts = data / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi", "should_refuse": false}\n')
    result = run("eval", "--base", base_copy, "--prompts", prompts, "-o", data, "--force")
    assert_user_error(result, "input")
    result = run("sweep", "--base", base_copy, "--vector", f"a={chat_adapter}", "--prompts", prompts, "-o", data, "-f")
    assert_user_error(result, "input")
    assert prompts.exists() and sorted(p.name for p in data.iterdir()) == ["prompts.jsonl"]


def test_train_and_vector_outputs_never_hold_their_data(pairs_file, tmp_path):
    before = pairs_file.read_bytes()
    assert_user_error(run("train", "--data", pairs_file, "-o", pairs_file, "--force"), "input")
    assert_user_error(run("train", "--data", pairs_file, "-o", tmp_path, "--force"), "input")
    assert_user_error(run("vector", "--data", pairs_file, "-o", pairs_file, "-f"), "input")
    (tmp_path / "runs").mkdir()
    out = tmp_path / "runs" / "phi"
    result = run("vector", "--data", pairs_file, "-o", out, "--keep-runs", tmp_path / "runs", "-f")
    assert_user_error(result, "overlaps")
    assert pairs_file.read_bytes() == before and not list((tmp_path / "runs").iterdir())


def test_train_inside_a_base_creates_nothing_there(base_copy, pairs_file):
    before = tree_digest(base_copy)
    quick = ["--max-steps", 1, "--batch-size", 2, "--max-length", 48, "--no-4bit"]
    result = run("train", "--data", pairs_file, "--base", base_copy, "-o", base_copy / "sub" / "run", *quick)
    assert_user_error(result, "input")
    assert tree_digest(base_copy) == before and not (base_copy / "sub").exists()


# -- §2: --force replaces only a file, an empty folder or an earlier output of the same kind --


def test_force_does_not_delete_a_users_folder(adapter_factory, tmp_path):
    a = adapter_factory("A")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "notes.txt").write_text("x")
    message = assert_user_error(run("combine", a, "-o", docs, "--force"), "not an adapter folder")
    assert str(docs / "notes.txt") in message  # names what it would delete
    assert (docs / "notes.txt").read_text() == "x" and not leftovers(tmp_path)


def test_force_replaces_a_file_an_empty_folder_and_an_earlier_adapter(adapter_factory, tmp_path):
    a, b = adapter_factory("A"), adapter_factory("B")
    empty, earlier, file = tmp_path / "empty", tmp_path / "earlier", tmp_path / "file"
    empty.mkdir()
    file.write_text("old")
    assert run("combine", a, "-o", earlier).exit_code == 0
    for target in (empty, earlier, file):
        result = run("combine", b, "-o", target, "--force")
        assert result.exit_code == 0, result.output
        assert (target / "adapter_model.safetensors").is_file()
    single = tmp_path / "mix.safetensors"
    assert run("combine", a, "-o", single).exit_code == 0
    assert run("combine", b, "-o", single, "-f").exit_code == 0
    assert not leftovers(tmp_path)


def test_force_never_replaces_a_folder_with_a_file(adapter_factory, tmp_path):
    folder = tmp_path / "x.safetensors"
    folder.mkdir()
    (folder / "keep.txt").write_text("x")
    assert_user_error(run("combine", adapter_factory("A"), "-o", folder, "-f"), "keep.txt")
    assert (folder / "keep.txt").read_text() == "x"


@pytest.mark.parametrize(
    "kind, files",
    [
        ("adapter", ["adapter_config.json", "adapter_model.safetensors"]),
        ("model", ["config.json", "model.safetensors"]),
        ("model", ["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors"]),
        ("eval", ["results.json", "summary.md", "completions.jsonl"]),
        ("sweep", ["sweep.csv", "sweep.json", "heatmap.png"]),
        ("runs", ["positive/adapter_config.json", "negative/adapter_config.json"]),
        ("mixes", ["balanced/adapter_config.json", "balanced/adapter_model.safetensors", "safer/adapter_config.json"]),
        ("gguf", ["helpful.gguf", "harmless.gguf"]),
    ],
)
def test_force_recognises_earlier_outputs_of_each_kind(tmp_path, kind, files):
    earlier = tmp_path / "earlier"
    for name in files:
        (earlier / name).parent.mkdir(parents=True, exist_ok=True)
        (earlier / name).write_text("{}")
    assert atomic.check_output(earlier, force=True, kind=kind).path == earlier
    with pytest.raises(LoraArithError, match="exists; pass force"):
        atomic.check_output(earlier, kind=kind)
    other = "eval" if kind != "eval" else "adapter"
    with pytest.raises(LoraArithError, match="force would delete") as raised:
        atomic.check_output(earlier, force=True, kind=other)
    assert "--force would delete" in raised.value.message(lambda option: "--" + option)


@pytest.mark.parametrize("kind, files", [("mixes", ["a/adapter_config.json"]), ("gguf", ["a.gguf"])])
def test_force_replaces_a_folder_of_mixes_only_if_it_holds_nothing_else(tmp_path, kind, files):
    """A folder of exported mixes (or GGUF files) is recognised by what it holds, all of it: one
    file of the user's beside them and ``force`` refuses to delete the folder."""
    earlier = tmp_path / "earlier"
    for name in [*files, "notes.txt"]:
        (earlier / name).parent.mkdir(parents=True, exist_ok=True)
        (earlier / name).write_text("{}")
    with pytest.raises(LoraArithError, match="force would delete"):
        atomic.check_output(earlier, force=True, kind=kind)
    (earlier / "notes.txt").unlink()
    assert atomic.check_output(earlier, force=True, kind=kind).path == earlier


def test_export_mix_again_with_force_replaces_its_own_output(adapter_factory, tiny_llama, tmp_path):
    """``export --mix ... -o out -f`` a second time said 'not empty' (and so did GGUF exports)."""
    a, b = adapter_factory(), adapter_factory()
    for target in (["--for", "vllm"], ["--for", "llama.cpp", "--base", tiny_llama]):
        out = tmp_path / target[1]
        for attempt in range(2):
            result = CliRunner().invoke(main, ["export", str(a), str(b), *map(str, target), "--mix", "m=1,0.5", "-o", str(out), "-f"])
            assert result.exit_code == 0, result.output


def test_eval_force_refuses_a_users_folder(base_copy, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi", "should_refuse": false}\n')
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "notes.txt").write_text("x")
    result = run("eval", "--base", base_copy, "--prompts", prompts, "-o", docs, "--force")
    assert_user_error(result, "not an eval folder", "notes.txt")
    assert (docs / "notes.txt").read_text() == "x"


# -- §5: concurrent writers ----------------------------------------------------------------------

_RACE = """
import sys, time
from pathlib import Path
import lora_arith._internal.atomic as atomic
from lora_arith.cli import main

barrier, count = Path(sys.argv[1]), int(sys.argv[2])
move = atomic._move_into_place

def held_move(*args, **kwargs):
    # every writer has checked the output and written its temporary before any of them renames
    (barrier / str(sys.argv[3])).touch()
    deadline = time.monotonic() + 60
    while len(list(barrier.iterdir())) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    return move(*args, **kwargs)

atomic._move_into_place = held_move
main(sys.argv[4:], prog_name="lora-arith")
"""


def test_concurrent_writers_never_overwrite_each_other(adapter_factory, tmp_path, name="mix"):
    """Five real runs; the rename itself is the same for files (see the fallback test below)."""
    from lora_arith.lora.adapter_io import open_adapter

    a = adapter_factory("A")
    out, barrier = tmp_path / name, tmp_path / "barrier"
    barrier.mkdir()
    runs = [
        python(_RACE, barrier, 5, index, "combine", f"{a}:{index + 1}", "-o", out, "--method", "cat")
        for index in range(5)
    ]
    results = [(process.wait(timeout=300), *process.communicate()) for process in runs]
    winners = [i for i, (code, _, _) in enumerate(results) if code == 0]
    assert len(winners) == 1, results
    for i, (code, stdout, stderr) in enumerate(results):
        if i != winners[0]:
            assert code == 1 and "Traceback" not in stderr, stderr
            lines = stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("Error: ") and "appeared" in lines[0], stderr
    weights = [item["weight"] for item in open_adapter(out).recipe["inputs"]]
    assert weights == [winners[0] + 1.0]  # the winner's output, intact
    assert not leftovers(tmp_path)


@pytest.mark.parametrize("directory", [False, True], ids=["file", "folder"])
def test_no_replace_rename_without_renameat2(monkeypatch, tmp_path, directory):
    monkeypatch.setattr(atomic, "_renameat2", lambda *args: False)  # file systems without RENAME_NOREPLACE
    out = tmp_path / "out"
    output = atomic.check_output(out, kind="folder" if directory else "file")
    with pytest.raises(LoraArithError, match="appeared"):
        with atomic.atomic_output(output) as temporary:
            (temporary / "a" if directory else temporary).write_text("mine")
            out.mkdir() if directory else out.write_text("theirs")
            if directory:
                (out / "b").write_text("theirs")
    assert (out / "b" if directory else out).read_text() == "theirs" and not leftovers(tmp_path)


# -- §6: leftovers after a kill ------------------------------------------------------------------

_HOLD = """
import sys, time
from pathlib import Path
import safetensors.torch
from lora_arith.cli import main

ready = Path(sys.argv[1])
save = safetensors.torch.save_file

def slow_save(tensors, filename, metadata=None):
    save(tensors, filename, metadata=metadata)
    ready.write_text(str(filename))
    time.sleep(120)

safetensors.torch.save_file = slow_save
import lora_arith.lora.adapter_io
lora_arith.lora.adapter_io.save_file = slow_save
main(sys.argv[2:], prog_name="lora-arith")
"""


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_and_hold(adapter: Path, out: Path, ready: Path) -> subprocess.Popen:
    # a shell without job control starts background jobs with SIGINT ignored; a user's Ctrl-C is not
    process = python(_HOLD, ready, "combine", adapter, "-o", out, preexec_fn=_default_sigint)
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the writer never started"
        time.sleep(0.05)
    return process


@pytest.mark.parametrize(
    "signum, name",
    [(signal.SIGTERM, "mix"), (signal.SIGTERM, "mix.safetensors"), (signal.SIGINT, "mix")],
    ids=["SIGTERM-folder", "SIGTERM-file", "SIGINT-folder"],
)
def test_signal_removes_the_temporary(adapter_factory, tmp_path, signum, name):
    out, ready = tmp_path / name, tmp_path / "ready"
    process = _start_and_hold(adapter_factory("A"), out, ready)
    temporaries = leftovers(tmp_path)
    assert len(temporaries) == 1
    assert re.fullmatch(rf"\.{re.escape(name)}\.lora-arith-tmp\.{process.pid}\.[0-9a-f]+", temporaries[0].name)
    process.send_signal(signum)
    code = process.wait(timeout=60)
    _, stderr = process.communicate()
    assert code != 0 and "Traceback" not in stderr, stderr
    if signum == signal.SIGTERM:
        assert code == -signal.SIGTERM  # still dies of the signal, as `timeout` expects
    assert not leftovers(tmp_path) and not out.exists()


def test_next_run_removes_what_a_sigkill_left(adapter_factory, tmp_path):
    a = adapter_factory("A")
    out, ready = tmp_path / "mix", tmp_path / "ready"
    process = _start_and_hold(a, out, ready)
    process.kill()
    process.wait(timeout=60)
    process.communicate()
    stale = leftovers(tmp_path)
    assert len(stale) == 1 and str(process.pid) in stale[0].name
    # another, running process's temporary is kept; one whose pid now belongs to a newer process goes
    alive = tmp_path / f".mix.lora-arith-tmp.{os.getpid()}.abcd1234"
    reused = tmp_path / f".mix.lora-arith-tmp.{os.getpid()}.0000beef"
    alive.mkdir()
    reused.mkdir()
    os.utime(reused, (946684800, 946684800))  # last written in 2000, before this process started
    other = tmp_path / ".other.lora-arith-tmp.999999999.abcd1234"
    other.mkdir()
    completed = cli("combine", a, "-o", out)
    assert completed.returncode == 0, completed.stderr
    assert leftovers(tmp_path) == sorted([alive, other])  # only the same output's stale ones go
    assert (out / "adapter_model.safetensors").is_file()


def test_stale_temporaries_of_dead_processes(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.lora-arith-tmp.{dead.pid}.12ab"
    stale.write_text("partial")
    assert atomic.remove_stale_temporaries(tmp_path / "out") == [stale] and not stale.exists()


# -- §7: output errors are one-line errors -------------------------------------------------------


@pytest.mark.parametrize("target", [".", "x/..", "/", "~/.."])
def test_nameless_outputs_are_refused(adapter_factory, tmp_path, monkeypatch, target):
    a = adapter_factory("A")
    (tmp_path / "x").mkdir()
    monkeypatch.chdir(tmp_path)
    before = tree_digest(a)
    assert_user_error(run("combine", a, "-o", target, "--force"), "name")
    assert tree_digest(a) == before and (tmp_path / "x").is_dir()


def _mounted(tmp_path: Path, options: str, *args: object) -> subprocess.CompletedProcess:
    """Run the CLI with a fresh tmpfs mounted (``options``) at tmp_path/mnt, in a private mount namespace."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare to mount a small file system")
    mount = tmp_path / "mnt"
    mount.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    script = f'mount -t tmpfs -o {options} tmpfs "$1" || exit 77; shift; exec "$@"'
    command = ["unshare", "-m", "sh", "-c", script, "sh", str(mount), sys.executable, "-m", "lora_arith"]
    completed = subprocess.run([*command, *map(str, args)], capture_output=True, text=True, env=env)
    if completed.returncode == 77:
        pytest.skip("cannot mount a tmpfs here")
    return completed


def _assert_one_line_error(completed: subprocess.CompletedProcess, *fragments: str) -> None:
    assert completed.returncode == 1, (completed.returncode, completed.stderr)
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in completed.stderr, completed.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_full_disk_is_a_one_line_error(adapter_factory, tmp_path):
    a = adapter_factory("A")
    completed = _mounted(tmp_path, "size=4k", "combine", a, "-o", tmp_path / "mnt" / "mix")
    _assert_one_line_error(completed, "No space left on device")


def test_read_only_output_folder_is_a_one_line_error(adapter_factory, tmp_path):
    a = adapter_factory("A")
    completed = _mounted(tmp_path, "ro,size=64k", "combine", a, "-o", tmp_path / "mnt" / "mix")
    _assert_one_line_error(completed, "Read-only file system")


def test_unwritable_output_folder_is_a_one_line_error(adapter_factory, tmp_path, monkeypatch):
    """Without root: a folder without write permission (EACCES), simulated where root ignores modes."""
    a = adapter_factory("A")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", refuse)
    assert_user_error(run("combine", a, "-o", tmp_path / "mix"), "cannot write output", "Permission denied")


@pytest.mark.parametrize("name", ["mix", "out.jsonl"], ids=["safetensors", "python"])
def test_file_size_limit_is_a_one_line_error(adapter_factory, tmp_path, name):
    import resource

    a = adapter_factory("A")

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))

    if name.endswith(".jsonl"):  # a plain Python write, not safetensors'
        code = textwrap.dedent("""
            import sys
            import lora_arith._internal.atomic as atomic
            from lora_arith._internal.errors import LoraArithError
            try:
                with atomic.atomic_output(sys.argv[1]) as temporary:
                    temporary.write_text("x" * 100000)
            except LoraArithError as error:
                sys.exit(f"Error: {error}")
            """)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        completed = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / name)],
            capture_output=True,
            text=True,
            env=env,
            preexec_fn=limit,
        )
    else:
        completed = cli("combine", a, "-o", tmp_path / name, preexec_fn=limit, dont_write_bytecode=True)
    _assert_one_line_error(completed, "File too large")
    assert not leftovers(tmp_path) and not (tmp_path / name).exists()


# -- issue 12 §2: ordinary modes for every file of every output ----------------------------------


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield 0o027
    os.umask(previous)


def _assert_modes(path: Path, mask: int) -> None:
    entries = [path, *path.rglob("*")] if path.is_dir() else [path]
    assert len(entries) > 1 or path.is_file()
    for entry in entries:
        expected = (0o777 if entry.is_dir() else 0o666) & ~mask
        assert entry.stat().st_mode & 0o777 == expected, (entry, oct(entry.stat().st_mode))


def test_output_modes_follow_the_umask(adapter_factory, base_copy, chat_adapter, tmp_path, umask_027):
    a = adapter_factory("A")
    outputs = {
        "combine": (["combine", a, "-o", tmp_path / "mix"], tmp_path / "mix"),
        "single": (["combine", a, "-o", tmp_path / "mix.safetensors"], tmp_path / "mix.safetensors"),
        "export": (["export", a, "-o", tmp_path / "vllm"], tmp_path / "vllm"),
        "merge": (["merge", "--base", base_copy, "--adapter", chat_adapter, "-o", tmp_path / "m"], tmp_path / "m"),
    }
    for name, (args, path) in outputs.items():
        result = run(*args)
        assert result.exit_code == 0, (name, result.output)
        _assert_modes(path, umask_027)


def test_output_modes_with_a_permissive_umask(adapter_factory, tmp_path):
    previous = os.umask(0o002)
    try:
        result = run("combine", adapter_factory("A"), "-o", tmp_path / "mix")
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.output
    _assert_modes(tmp_path / "mix", 0o002)


# -- one check per run (issue 13 wants exactly one place) ----------------------------------------


def test_each_command_checks_its_output_once(adapter_factory, base_copy, chat_adapter, tmp_path, monkeypatch):
    created = []

    class CountedOutput(atomic.Output):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            created.append(self.path)

    monkeypatch.setattr(atomic, "Output", CountedOutput)
    a, b = adapter_factory("A"), adapter_factory("B")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    commands = [
        ["combine", a, "-o", tmp_path / "c"],
        ["extract", a, b, "-o", tmp_path / "e.safetensors"],
        ["export", a, "-o", tmp_path / "x"],
        ["merge", "--base", base_copy, "--adapter", chat_adapter, "-o", tmp_path / "m"],
        ["generate", "--base", base_copy, "--prompts", prompts, "-o", tmp_path / "g.jsonl", "--max-new-tokens", 2],
    ]
    for args in commands:
        created.clear()
        result = run(*args)
        assert result.exit_code == 0, (args, result.output)
        assert created == [Path(args[args.index("-o") + 1])], args


# -- issue 12 §8: one flag vocabulary --------------------------------------------------------------

WRITERS = {"combine", "extract", "export", "merge", "generate", "train", "vector", "eval", "sweep"}
MODEL_LOADERS = {"generate", "chat", "eval", "sweep", "merge", "train", "vector"}


def _options(command: click.Command) -> dict[str, click.Option]:
    return {p.name: p for p in command.params if isinstance(p, click.Option)}


def test_every_writer_takes_output_and_force():
    for name in WRITERS:
        options = _options(main.commands[name])
        assert {"-o", "--output"} <= set(options["output"].opts), name
        assert {"-f", "--force"} <= set(options["force"].opts), name


def test_every_model_loader_takes_device():
    for name in MODEL_LOADERS:
        assert "--device" in _options(main.commands[name])["device"].opts, name


def test_the_4bit_switch_reads_the_same_everywhere():
    spellings = {
        name: (tuple(option.opts), tuple(option.secondary_opts))
        for name, command in main.commands.items()
        for option in command.params
        if "4bit" in option.name
    }
    assert set(spellings) >= {"generate", "chat", "eval", "sweep", "merge", "train", "vector"}
    assert set(spellings.values()) == {(("--4bit",), ("--no-4bit",))}


@pytest.mark.parametrize("name", ["generate", "eval", "sweep"])
def test_old_out_spelling_works_and_is_hidden(name):
    command = main.commands[name]
    required = {"sweep": ["--vector", "a=b"]}.get(name, [])
    context = command.make_context(name, ["--out", "somewhere", *required])
    assert context.params["output"] == Path("somewhere")
    help_text = CliRunner().invoke(main, [name, "--help"]).output
    assert "-o, --output" in help_text and not re.search(r"--out\b", help_text)


def test_generate_old_spelling_still_writes(base_copy, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    out = tmp_path / "g.jsonl"
    result = run("generate", "--base", base_copy, "--prompts", prompts, "--out", out, "--max-new-tokens", 2)
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text().splitlines()[0])["prompt"] == "hi"


def test_train_takes_short_force_and_4bit_switch(pairs_file, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("x")
    result = run("train", "--data", pairs_file, "-o", out, "-f", "--4bit", "--device", "cpu")
    assert_user_error(result, "not an adapter folder")
    context = main.commands["train"].make_context("train", ["--data", "d", "-o", "x", "--no-4bit", "-f"])
    assert context.params["quantize_4bit"] is False and context.params["force"] is True
