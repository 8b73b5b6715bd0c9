"""Parse once, check once: the spec parsers in lora_arith.lora.specs, library functions that take parsed
specs only, option choices taken from the library's constants, and library errors that name
options (OptionError) which the CLI shows as its flags."""

from __future__ import annotations

import ast
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import lora_arith
from lora_arith.cli import flag, main
from lora_arith.lora.combine import combine
from lora_arith._internal.devices import DTYPE_NAMES
from lora_arith._internal.errors import OptionError
from lora_arith._internal.provenance import EXPORT_TARGETS, METHODS
from lora_arith.lora.specs import (
    AdapterSpec,
    adapter_names,
    file_stem,
    fixed_weights,
    named_paths,
    named_weights,
    parse_specs,
    parse_weight,
)

FOREIGN_FLAGS = {"--max-lora-rank", "--no-deps", "--lora"}  # vLLM's, pip's and llama-server's, named in messages on purpose


def _option(command: click.Command, name: str) -> click.Option:
    return next(p for p in command.params if isinstance(p, click.Option) and p.name == name)


def test_library_errors_name_no_cli_flags():
    """No string in a ``raise`` of a library module (every module outside cli/) spells a flag."""
    package = Path(lora_arith.__file__).parent
    found = []
    modules = sorted(p for p in package.rglob("*.py") if "cli" not in p.relative_to(package).parts)
    assert len(modules) > 30
    for path in modules:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Raise):
                continue
            for constant in ast.walk(node):
                if isinstance(constant, ast.Constant) and isinstance(constant.value, str):
                    words = {word.strip("'\"(),;:") for word in constant.value.split()}
                    flags = {w for w in words if w.startswith("--") and w[2:3].isalpha()} - FOREIGN_FLAGS
                    found += [f"{path.name}:{node.lineno}: {f}" for f in sorted(flags)]
    assert found == []


def test_option_error_names_options_in_python_and_as_flags():
    error = OptionError(("rank", "energy", "method"), "{} and {} need {} svd")
    assert str(error) == "rank and energy need method svd"
    assert error.message(lambda option: "--" + option) == "--rank and --energy need --method svd"
    values = OptionError("fix", "{} {item!r} is {{odd}}", item="a={b}")
    assert str(values) == "fix 'a={b}' is {odd}"  # user text is a value, never a template
    assert flag(main.commands["merge"], "quantize_4bit") == "--4bit"
    assert flag(main.commands["combine"], "output") == "--output"
    assert flag(main.commands["serve"], "max_eta") == "--max-eta"
    assert flag(None, "max_rank") == "--max-rank"


def test_the_cli_shows_library_option_errors_with_its_flags(adapter_factory, tmp_path):
    adapter = adapter_factory()
    with pytest.raises(OptionError, match="^rank must be a whole number of at least 1, got 0$"):
        combine([AdapterSpec(str(adapter))], method="svd", rank=0)
    result = CliRunner().invoke(main, ["combine", str(adapter), "-o", str(tmp_path / "x"), "--method", "svd", "--rank", "0"])
    assert result.exit_code == 1
    assert result.output.strip() == "Error: --rank must be a whole number of at least 1, got 0"
    result = CliRunner().invoke(main, ["export", str(adapter), "--max-rank", "0", "-o", str(tmp_path / "e")])
    assert result.exit_code == 1 and "Error: --max-rank must be a whole number of at least 1" in result.output
    # from Python, text or fractions are the same one-line errors (TypeErrors before)
    for bad in ("4", 2.5, True):
        with pytest.raises(OptionError, match="rank must be a whole number"):
            combine([AdapterSpec(str(adapter))], method="svd", rank=bad)
        with pytest.raises(OptionError, match="max_rank must be a whole number"):
            lora_arith.export([str(adapter)], tmp_path / "e", max_rank=bad)
    with pytest.raises(OptionError, match="energy must be in"):
        combine([AdapterSpec(str(adapter))], method="svd", energy="0.5")


def test_library_functions_take_parsed_specs(adapter_factory, tiny_llama, tmp_path):
    adapter = adapter_factory()
    with pytest.raises(TypeError, match="parse_specs"):
        combine([f"{adapter}:0.5"])
    with pytest.raises(TypeError, match="merge_adapters\\(\\) takes AdapterSpec objects"):  # an AttributeError before
        lora_arith.merge(str(tiny_llama), [str(adapter)], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    # the analyses take paths as well as opened adapters (an AttributeError before)
    assert lora_arith.similarity([str(adapter), adapter]).overall[0, 1] == pytest.approx(1.0)
    assert lora_arith.interference([adapter, lora_arith.open_adapter(adapter)])[0].cosine == pytest.approx(1.0)
    result = combine(parse_specs([f"{adapter}:0.5"]))
    assert [item.weight for item in result.recipe.inputs] == [0.5]
    assert result.sources and all(isinstance(p, Path) for p in result.sources)  # the inputs, carried


def test_an_adapter_is_named_by_its_file_or_folder_in_one_place():
    """``serve``, ``export --for llama.cpp`` and every NAME-less spec name an adapter alike."""
    stems = ["runs/helpful/", "a/kind.safetensors", "runs/harmless/adapter_model.safetensors", "x", "loras/safe.gguf"]
    assert [file_stem(path) for path in stems] == ["helpful", "kind", "harmless", "x", "safe"]
    named = adapter_names([AdapterSpec(path) for path in [*stems, "other/helpful", "runs/mix-0.5"]])
    assert list(named) == ["helpful", "kind", "harmless", "x", "safe", "helpful-2", "mix-0_5"]


def test_sweep_names_and_fixed_weights():
    assert named_paths(["h=a/b", "s=c:d"]) == {"h": "a/b", "s": "c:d"}
    with pytest.raises(OptionError, match="cannot read vector 'nope'; use NAME=PATH"):
        named_paths(["nope"])
    with pytest.raises(OptionError, match="^vector h is given twice$"):
        named_paths(["h=a", "h=b"])
    assert fixed_weights(["h=0.5"], ["h", "s"]) == {"h": 0.5}
    with pytest.raises(OptionError, match="names no swept vector; vectors: h, s"):
        fixed_weights(["x=1"], ["h", "s"])
    with pytest.raises(OptionError, match="cannot read fix 'h=x'"):
        fixed_weights(["h=x"], ["h"])


def test_one_name_weight_parser_with_each_options_message(tmp_path):
    """``NAME=WEIGHT`` is read in one place (``parse_weight``/``named_weights``): a non-empty name,
    finite numbers; each option keeps its own message."""
    assert parse_weight("h = -0.5") == ("h", -0.5)
    assert named_weights("m=1,-2") == ("m", [1.0, -2.0])
    for bad in ("h", "=1", "h=", "h=x", "h=nan", "h=inf", "h=1e999", "h=1,2"):
        with pytest.raises(OptionError, match=f"^cannot read fix {bad!r}; use NAME=WEIGHT$"):
            parse_weight(bad, "fix")

    def error(*args: str) -> str:
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code == 1, result.output
        return result.output.strip()

    nowhere = str(tmp_path / "nowhere")  # every error below comes before any adapter or model is read
    assert error("serve", "--weights", "h=1,s=x") == "Error: cannot read 's=x' in --weights; use NAME=WEIGHT,NAME=WEIGHT"
    assert error("serve", "--adapter", f"h={nowhere}", "--weights", "h=1,no=2") == (
        "Error: --weights names no, which no --adapter is named"
    )
    assert error("serve", "--adapter", f"h={nowhere}:5") == "Error: the default weight of h (5) is above --max-eta 4"
    assert error("serve", "--api-key", "") == "Error: --api-key (or LORA_ARITH_API_KEY) must not be empty"
    # a non-ASCII key could never match what clients send; an empty variable served with no key
    assert error("serve", "--api-key", "clé", "--port", "-1") == "Error: --api-key must be printable ASCII without spaces"
    unset = CliRunner().invoke(main, ["serve", "--port", "-1"], env={"LORA_ARITH_API_KEY": ""})
    assert unset.exit_code == 1 and unset.output.strip() == (
        "Error: LORA_ARITH_API_KEY is set but empty: set it to a key, or unset it to serve without one"
    )
    assert error("export", nowhere, nowhere, "--mix", "m=1,y", "-o", nowhere) == (
        "Error: --mix 'm=1,y': the weights must be numbers separated by commas"
    )
    assert error("export", nowhere, nowhere, "--mix", "m=1,2", "--mix", "m=2,1", "-o", nowhere) == (
        "Error: each --mix needs its own NAME"
    )
    assert error("export", nowhere, nowhere, "-o", nowhere).startswith("Error: several adapters are exported as mixes: give --mix")


def test_sweep_reports_vector_errors_by_flag(tmp_path):
    result = CliRunner().invoke(main, ["sweep", "--vector", "nope", "--prompts", __file__, "-o", str(tmp_path / "s")])
    assert result.exit_code == 1 and "Error: cannot read --vector 'nope'; use NAME=PATH" in result.output


@pytest.mark.parametrize(
    "command, option, choices",
    [
        ("combine", "method", METHODS),
        ("extract", "method", METHODS),
        ("vector", "method", METHODS),
        ("combine", "dtype", DTYPE_NAMES),
        ("vector", "dtype", DTYPE_NAMES),
        ("merge", "dtype", DTYPE_NAMES),
        ("export", "target", EXPORT_TARGETS),
    ],
)
def test_option_choices_are_the_library_constants(command, option, choices):
    assert tuple(_option(main.commands[command], option).type.choices) == tuple(choices)


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "CPU", ""])
def test_a_device_that_is_not_one_is_a_one_line_error(chat_base, adapter_factory, tmp_path, device):
    """``--device gpu`` raised torch's RuntimeError from deep inside loading (a traceback)."""
    import torch

    from lora_arith._internal.devices import resolve_device
    from lora_arith.lora.specs import AdapterSpec

    result = CliRunner().invoke(main, ["generate", "--base", str(chat_base), "--device", device, "hi"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1] == f"Error: --device must be 'cpu', 'cuda', 'cuda:N' or 'mps', not {device!r}"
    with pytest.raises(OptionError, match="device must be"):
        lora_arith.PreferenceMixer(str(chat_base), {}, device=device)
    with pytest.raises(OptionError, match="device must be"):  # before the merge streams, nothing written
        lora_arith.merge(str(chat_base), [AdapterSpec(str(adapter_factory()), 1.0)], tmp_path / "m", device=device)
    assert not (tmp_path / "m").exists()
    assert resolve_device("cpu") == "cpu" and resolve_device(None) in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(OptionError, match="device cuda:1: no CUDA GPU is visible here"):
            resolve_device("cuda:1")


@pytest.mark.parametrize("weight", [None, "0.5", True, 10**400, float("nan"), float("inf"), [1.0]])
def test_an_adapter_spec_made_in_python_takes_only_a_finite_number(adapter_factory, weight):
    """``AdapterSpec(path, weight)`` from Python: a None, text, bool, huge, NaN or list weight was a
    TypeError/OverflowError deep in combine or merge, a misleading overflow message, or (``"0.5"``,
    ``True``) a recipe that recorded it as text or ``true``."""
    from lora_arith._internal.errors import LoraArithError
    from lora_arith.lora.specs import AdapterSpec

    path = str(adapter_factory())
    with pytest.raises(LoraArithError, match="is not a finite number"):
        AdapterSpec(path, weight)
    spec = AdapterSpec(Path(path), 2)  # a Path and an int are fine: kept as text and float
    assert spec.path == path and spec.weight == 2.0 and type(spec.weight) is float
    with pytest.raises(LoraArithError, match="non-empty path"):
        AdapterSpec("", 1.0)
