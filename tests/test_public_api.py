"""The public API: ``import lora_arith`` is light and lazy (PEP 562), every public name resolves,
type checkers see the same names, the package ships ``py.typed``, every public module has
``__all__``, and the layout keeps at most 8 modules directly under ``lora_arith/``."""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lora_arith

PACKAGE = Path(lora_arith.__file__).parent


def test_import_loads_no_torch_and_names_load_on_first_use():
    code = (
        "import sys, lora_arith\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'trl', 'numpy') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "assert 'combine' in dir(lora_arith) and 'combine' not in vars(lora_arith)\n"
        "lora_arith.combine\n"
        "assert 'torch' in sys.modules and 'transformers' not in sys.modules\n"  # combine stays off transformers
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "ok\n", result.stderr


def test_every_public_name_resolves_and_type_checkers_see_the_same_names():
    required = {
        "combine", "extract", "AdapterFile", "load_adapter", "PreferenceMixer", "train_preference", "train_vector",
        "evaluate", "sweep", "tune", "merge", "export", "push", "interference", "TrainConfig", "TrainResult",
        "Combination", "EvalConfig", "EvalResult", "SweepResult", "TuneResult",
    }  # fmt: skip
    assert required <= set(lora_arith.__all__)
    for name in lora_arith.__all__:
        assert getattr(lora_arith, name) is not None, name
    assert lora_arith.load_adapter is lora_arith.open_adapter and lora_arith.merge is lora_arith.merge_adapters

    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING")
    seen = {}
    for node in block.body:
        for alias in node.names:
            seen[alias.asname or alias.name] = (node.module.removeprefix("lora_arith."), alias.name)
    assert seen == lora_arith._LAZY


def test_all_is_literal_and_reexports_are_explicit():
    """``mypy --strict`` sees a public name only in a literal ``__all__`` or as an explicit
    re-export (``from M import X as X``); ``["__version__", *_LAZY]`` hid every name from it."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    assigned = next(n for n in tree.body if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "__all__")
    assert ast.literal_eval(assigned.value) == ["__version__", *lora_arith._LAZY]
    block = next(n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING")
    plain = [alias.name for node in block.body for alias in node.names if alias.asname is None]
    assert plain == []


USER_SCRIPT = """
from __future__ import annotations

import lora_arith as la
from lora_arith import AdapterSpec, OptionError, combine


def mix(paths: list[str]) -> la.Combination:
    try:
        return combine([AdapterSpec(path, 1.0) for path in paths], method="svd", rank=8)
    except OptionError as error:
        raise SystemExit(str(error)) from None


def mixer(base: str, adapters: dict[str, str]) -> la.PreferenceMixer:
    return la.PreferenceMixer(base, adapters)
"""


def test_a_users_code_passes_mypy_strict(tmp_path):
    """A notebook user's typed code that uses the public API passes ``mypy --strict`` (the names
    are exported, the results typed), and a wrong use of a result is caught."""
    pytest.importorskip("mypy")
    config = tmp_path / "mypy.ini"
    heavy = "torch,transformers,peft,trl,datasets,accelerate,bitsandbytes,huggingface_hub,safetensors,numpy"
    skipped = ",".join(f"{name}.*" for name in heavy.split(","))
    # lora_arith is read from this checkout (an editable install's import hook is invisible to
    # mypy), as an installed package's errors would be: not reported; heavy dependencies unread
    config.write_text(f"[mypy]\ncache_dir = {tmp_path / 'cache'}\n[mypy-lora_arith.*]\nignore_errors = True\n"
                      f"[mypy-{skipped}]\nfollow_imports = skip\n")  # fmt: skip
    good, bad = tmp_path / "good.py", tmp_path / "bad.py"
    good.write_text(USER_SCRIPT)
    bad.write_text(USER_SCRIPT + "\n\nnumber: int = mix([])\n")
    env = {**os.environ, "MYPYPATH": str(PACKAGE.parent)}
    runs = {
        path.name: subprocess.run(
            [sys.executable, "-m", "mypy", "--strict", "--config-file", str(config), str(path)],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
        )
        for path in (good, bad)
    }  # fmt: skip
    assert runs["good.py"].returncode == 0, runs["good.py"].stdout
    assert runs["bad.py"].returncode == 1 and '"Combination"' in runs["bad.py"].stdout, runs["bad.py"].stdout


def test_unknown_names_are_attribute_errors():
    try:
        lora_arith.no_such_name
    except AttributeError as error:
        assert "no_such_name" in str(error)
    else:
        raise AssertionError("no AttributeError")


def test_py_typed_is_shipped():
    assert (PACKAGE / "py.typed").is_file()
    setup = (PACKAGE.parent / "setup.cfg").read_text()
    assert "py.typed" in setup.split("[options.package_data]")[1].split("[")[0]


def test_every_public_module_has_a_complete_all():
    """Every public module lists its public names in ``__all__``: each listed name exists, and
    each class or function it defines without a leading underscore is listed."""
    missing, wrong, unlisted = [], [], []
    for info in pkgutil.walk_packages([str(PACKAGE)], "lora_arith."):
        leaf = info.name.rsplit(".", 1)[-1]
        if info.ispkg or leaf.startswith("_"):
            continue
        module = importlib.import_module(info.name)
        names = getattr(module, "__all__", None)
        if names is None:
            missing.append(info.name)
            continue
        wrong += [f"{info.name}.{name}" for name in names if not hasattr(module, name)]
        unlisted += [
            f"{info.name}.{name}"
            for name, value in vars(module).items()
            if not name.startswith("_")
            and (inspect.isclass(value) or inspect.isfunction(value))
            and value.__module__ == info.name
            and name not in names
        ]
    assert missing == [] and wrong == [] and unlisted == []


def test_the_layout_shows_the_layers():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 8, top
    packages = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
    assert packages == ["_internal", "cli", "evaluation", "lora", "model", "serving", "sharing", "training"]


def test_result_objects_show_a_short_summary(chat_base, two_adapters, tmp_path):
    """In a notebook the last expression of a cell is shown by its repr: a result object shows a
    summary of one line, not its factors, every module's rank, every step or every point (a
    Combination of the shipped vectors printed 256,000 characters; an AdapterFile and a
    PreferenceMixer showed only their address)."""
    from lora_arith.evaluation.search import parse_constraints
    from lora_arith.sharing.gguf import GgufExport

    shipped = [str(Path(__file__).resolve().parents[1] / "adapters" / name) for name in ("helpful", "harmless")]
    many = {f"model.layers.{i}.q_proj": 8 for i in range(2000)}
    combination = lora_arith.combine(lora_arith.parse_specs([f"{shipped[0]}:1", f"{shipped[1]}:0.5"]))
    shown = {
        "Combination(inputs=['helpful:1', 'harmless:0.5'], method='cat', modules=210, rank=16": combination,
        "AdapterFile(": lora_arith.open_adapter(shipped[0]),
        "LowRankDelta(shape=(576, ": combination.deltas["model.layers.0.mlp.down_proj"],
        "Similarity(labels=": lora_arith.similarity(shipped),
        "PairInterference(first=": lora_arith.interference(shipped)[0],
        "Export(path=": lora_arith.Export(tmp_path, many, {name: 0.1 for name in many}),
        "GgufExport(path=": GgufExport(tmp_path / "a.gguf", many, "llama"),
        "SweepResult(directory=": lora_arith.SweepResult([{"eta_a": i / 7} for i in range(2000)], [], tmp_path),
        "TuneResult(eta={'a': 0.5}, objective='refusal_rate', subject_to='compliance_rate>=0.9 and refusal_rate>0.5', evaluated=2000": (
            lora_arith.TuneResult(
                {"a": 0.5}, {"points": list(range(2000))}, [{"eta_a": i / 7} for i in range(2000)], {}, {},
                "refusal_rate", parse_constraints(["compliance_rate>=0.9", "refusal_rate>0.5"]), {"a": "x"},
            )
        ),  # fmt: skip
        "TrainResult(path=": lora_arith.TrainResult(
            tmp_path, {"training": {"steps": 2000}}, [{"loss": 0.5, "step": i} for i in range(2000)]
        ),
        "EvalResult(label=": lora_arith.EvalResult("x", {"a": 1.0}, {}, [{"completion": "y" * 100}] * 2000),
        "EvalResult(label='y', metrics={'m0': 0.5": lora_arith.EvalResult(
            "y", {}, {f"m{i}": 0.5 for i in range(40)} | {"m0_ci": [0.1, 0.9]}, []
        ),
        "Similarity(labels=['a0', ": lora_arith.Similarity(  # 12 adapters: a 12×12 tensor printed over lines
            [f"a{i}" for i in range(12)], torch.rand(12, 12), {"q_proj": torch.rand(12, 12)}
        ),
        "PreferenceMixer(base=": lora_arith.PreferenceMixer(str(chat_base), {"helpful": two_adapters[0]}),
        "UploadPlan(files=['README.md', ": lora_arith.plan_upload(shipped[0]),  # not its whole model card
    }
    for start, value in shown.items():
        text = repr(value)
        assert text.startswith(start) and len(text) < 400, text
    # a repr never raises; a process of accelerate launch other than the main one says which
    assert repr(lora_arith.TrainResult(tmp_path, {"training": None}, [], rank=1)).endswith("steps=None, loss=None, process=1)")
