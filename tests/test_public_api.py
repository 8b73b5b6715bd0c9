"""The public API: ``import lora_arith`` is light and lazy (PEP 562), every public name resolves,
type checkers see the same names, the package ships ``py.typed``, every public module has
``__all__``, and the layout keeps at most 8 modules directly under ``lora_arith/``."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path

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
