"""The adapter commands through the CLI: success paths and every bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from lora_arith.cli import main


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_user_error(result, *fragments: str):
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_combine_summary_and_output(adapter_factory, tmp_path):
    a, b = adapter_factory(), adapter_factory(target_modules=["q_proj"])
    out = tmp_path / "mix"
    result = run("combine", f"{a}:0.8", f"{b}:-0.5", "-o", out, "--method", "svd", "--rank", "3")
    assert result.exit_code == 0, result.output
    assert "14 modules" in result.output and "relative error" in result.output
    assert "missing from some inputs" in result.output and "wrote" in result.output
    assert (out / "adapter_model.safetensors").is_file()


def test_combine_dtype_and_single_file(adapter_factory, tmp_path):
    out = tmp_path / "mix.safetensors"
    result = run("combine", adapter_factory(), "-o", out, "--dtype", "bf16")
    assert result.exit_code == 0, result.output
    assert {t.dtype for t in load_file(out).values()} == {torch.bfloat16}


def test_extract_is_positive_minus_negative(adapter_factory, tmp_path):
    from lora_arith.lora.adapter_io import open_adapter
    from lora_arith.lora.factors import to_dense

    pos, neg = adapter_factory(), adapter_factory()
    result = run("extract", pos, neg, "-o", tmp_path / "phi.safetensors")
    assert result.exit_code == 0, result.output
    phi, p, n = (open_adapter(x) for x in (tmp_path / "phi.safetensors", pos, neg))
    name = sorted(phi.modules)[3]
    expected = to_dense(p.delta(name)) - to_dense(n.delta(name))
    torch.testing.assert_close(to_dense(phi.delta(name)), expected, rtol=1e-5, atol=1e-6)
    assert [i["weight"] for i in phi.recipe["inputs"]] == [1.0, -1.0]


def test_inspect(adapter_factory):
    result = run("inspect", adapter_factory(r=3, lora_alpha=6))
    assert result.exit_code == 0, result.output
    assert "model.layers.1.mlp.down_proj" in result.output
    assert "48×32" in result.output or "32×48" in result.output
    assert "base model" in result.output and "     2" in result.output  # scaling alpha/r = 2


def test_similarity_matrix(adapter_factory):
    a = adapter_factory()
    result = run("similarity", a, a, adapter_factory())
    assert result.exit_code == 0, result.output
    assert "overall" in result.output and "q_proj" in result.output
    assert "1.0000" in result.output.splitlines()[2]


def test_existing_output_needs_force_and_inputs_are_untouched(adapter_factory, tmp_path):
    a = adapter_factory()
    before = (a / "adapter_model.safetensors").read_bytes()
    out = tmp_path / "out"
    assert run("combine", a, "-o", out).exit_code == 0
    assert_user_error(run("combine", a, "-o", out), "exists", "--force")
    assert run("combine", f"{a}:2", "-o", out, "--force").exit_code == 0
    assert_user_error(run("combine", a, "-o", a, "--force"), "overwrite an input")
    assert (a / "adapter_model.safetensors").read_bytes() == before


# -- bad input: one line, non-zero exit, no traceback, no output left behind -----------------


def _truncate(path):
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])


def _not_safetensors(path):
    (path / "adapter_model.safetensors").write_text("this is not a safetensors file")


def _wrong_rank_in_config(path):
    config = json.loads((path / "adapter_config.json").read_text())
    config["r"] = 5
    (path / "adapter_config.json").write_text(json.dumps(config))


def _nan_factor(path):
    weights = path / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, weights)


def _other_base(path):
    config = json.loads((path / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someone/other-model"
    (path / "adapter_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "damage, fragments",
    [
        (_truncate, ["not a readable safetensors file"]),
        (_not_safetensors, ["not a readable safetensors file"]),
        (_wrong_rank_in_config, ["config does not match tensors", "r=5"]),
        (_nan_factor, ["NaN or Inf"]),
        (_other_base, ["different base models", "--allow-base-mismatch"]),
    ],
    ids=["truncated", "not-safetensors", "config-mismatch", "nan", "base-mismatch"],
)
def test_damaged_input(adapter_factory, tmp_path, damage, fragments):
    good, bad = adapter_factory("good"), adapter_factory("bad")
    damage(bad)
    out = tmp_path / "out"
    assert_user_error(run("combine", good, bad, "-o", out), *fragments)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_base_mismatch_can_be_allowed(adapter_factory, tmp_path):
    good, other = adapter_factory(), adapter_factory()
    _other_base(other)
    result = run("combine", good, other, "-o", tmp_path / "out", "--allow-base-mismatch")
    assert result.exit_code == 0, result.output


def test_shape_conflict_names_the_module(adapter_factory, tiny_gpt2, tmp_path):
    a = adapter_factory("a")
    b = adapter_factory("b", base=tiny_gpt2, target_modules=["c_fc"], fan_in_fan_out=True)
    # Rename b's GPT-2 module onto a Llama module name with a different shape.
    weights = b / "adapter_model.safetensors"
    tensors = {
        k.replace("transformer.h.0.mlp.c_fc", "model.layers.0.self_attn.q_proj"): v
        for k, v in load_file(weights).items()
    }
    save_file(tensors, weights)
    config = json.loads((b / "adapter_config.json").read_text())
    config.update(fan_in_fan_out=False, base_model_name_or_path=None)
    (b / "adapter_config.json").write_text(json.dumps(config))
    assert_user_error(run("combine", a, b, "-o", tmp_path / "out"), "model.layers.0.self_attn.q_proj", "shape")


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["{a}", "{tmp}/missing"], ["no such file or directory"]),
        (["{a}:abc"], ["cannot parse the weight", "abc"]),
        (["{a}", "--method", "svd", "--rank", "999"], ["larger than module", "allows"]),
        (["{a}", "--rank", "2"], ["--method svd"]),
        (["{a}", "--method", "svd", "--energy", "1.5"], ["--energy"]),
        (["{a}", "--method", "svd", "--rank", "2", "--energy", "0.5"], ["not both"]),
    ],
    ids=["missing-path", "bad-weight", "rank-too-large", "rank-without-svd", "bad-energy", "rank-and-energy"],
)
def test_bad_arguments(adapter_factory, tmp_path, args, fragments):
    a = adapter_factory()
    out = tmp_path / "out"
    filled = [x.format(a=a, tmp=tmp_path) for x in args]
    assert_user_error(run("combine", *filled, "-o", out), *fragments)
    assert not out.exists()


def test_similarity_needs_two(adapter_factory):
    assert_user_error(run("similarity", adapter_factory()), "at least two")


def test_console_script_error_has_no_traceback(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "lora_arith", "combine", str(tmp_path / "nope"), "-o", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert completed.returncode == 1
    assert completed.stderr.strip().startswith("Error: ") and "Traceback" not in completed.stderr
    assert len(completed.stderr.strip().splitlines()) == 1


def test_start_up_imports_stay_light():
    code = (
        "import sys; from lora_arith.cli import main;"
        "print(','.join(m for m in ('torch', 'transformers', 'peft', 'trl', 'datasets') if m in sys.modules));"
        "import lora_arith.lora.combine, lora_arith.lora.analysis;"
        "print(','.join(m for m in ('transformers', 'peft', 'trl', 'datasets') if m in sys.modules))"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert completed.stdout.splitlines() == ["", ""]  # --help: no torch; combine: no model libraries


# ---- convert --------------------------------------------------------------------------------


def test_convert_round_trip_is_bit_identical(adapter_factory, tmp_path):
    from safetensors import safe_open

    from lora_arith.lora.adapter_io import open_adapter

    a, b = adapter_factory(r=4), adapter_factory(r=2, target_modules=["q_proj", "embed_tokens"])
    start = tmp_path / "mix"
    assert run("combine", f"{a}:0.5", f"{b}:-1", "--dtype", "bf16", "-o", start).exit_code == 0  # rank_pattern, bf16
    result = run("convert", start, "-o", tmp_path / "mix.safetensors")
    assert result.exit_code == 0 and "single file" in result.output, result.output
    assert run("convert", tmp_path / "mix.safetensors", "-o", tmp_path / "back").exit_code == 0
    assert run("convert", tmp_path / "back", "-o", tmp_path / "again.safetensors").exit_code == 0

    def raw(path):
        with safe_open(path, framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}

    original = raw(start / "adapter_model.safetensors")
    for path in (tmp_path / "mix.safetensors", tmp_path / "back" / "adapter_model.safetensors", tmp_path / "again.safetensors"):
        converted = raw(path)
        assert converted.keys() == original.keys()
        for key, tensor in original.items():
            assert converted[key].dtype == tensor.dtype == torch.bfloat16
            assert converted[key].view(torch.int16).equal(tensor.view(torch.int16))  # bit for bit
    first, single, back = open_adapter(start), open_adapter(tmp_path / "mix.safetensors"), open_adapter(tmp_path / "back")
    assert first.config == single.config == back.config and first.config["rank_pattern"]
    assert first.recipe == single.recipe == back.recipe
    assert json.loads((tmp_path / "back" / "adapter_config.json").read_text()) == first.config
    assert (tmp_path / "back" / "README.md").is_file()
    with safe_open(tmp_path / "again.safetensors", framework="pt") as again, safe_open(
        tmp_path / "mix.safetensors", framework="pt"
    ) as once:
        assert again.metadata() == once.metadata()  # the header's order is up to safetensors


def test_convert_refuses_to_overwrite(adapter_factory, tmp_path):
    a = adapter_factory()
    (tmp_path / "taken.safetensors").write_bytes(b"keep me")
    assert_user_error(run("convert", a, "-o", tmp_path / "taken.safetensors"), "exists")
    assert (tmp_path / "taken.safetensors").read_bytes() == b"keep me"
    assert run("convert", a, "-o", tmp_path / "taken.safetensors", "-f").exit_code == 0
    assert_user_error(run("convert", a, "-o", a, "-f"))


def test_convert_from_python_never_writes_over_its_input_even_with_force(adapter_factory, tmp_path):
    """``convert_adapter(x, x, force=True)`` rewrote its own input (only the command line checked)."""
    from lora_arith._internal.errors import LoraArithError
    from lora_arith.lora.adapter_io import convert_adapter

    folder = adapter_factory()
    single = convert_adapter(folder, tmp_path / "one.safetensors")
    for adapter in (folder, single):
        before = {p: p.read_bytes() for p in sorted(Path(adapter).parent.rglob("*")) if p.is_file()}
        with pytest.raises(LoraArithError):
            convert_adapter(adapter, adapter, force=True)
        assert {p: p.read_bytes() for p in sorted(Path(adapter).parent.rglob("*")) if p.is_file()} == before


def test_a_zero_delta_has_undefined_cosines_not_zero_ones(adapter_factory, tmp_path):
    """An untrained adapter (PEFT starts B at zero) has a zero delta: its cosines and energy shares
    are undefined. They read n/a with a note saying why (they read 0.0000 and "chance 0.0%", as if
    the two were orthogonal), are NaN in Python and null in interference's JSON."""
    from lora_arith.lora.analysis import interference, similarity

    zero, other = adapter_factory(), adapter_factory()
    weights = zero / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in tensors.items()}, weights)

    assert torch.isnan(similarity([zero, other]).overall).tolist() == [[True, True], [True, False]]
    pair = interference([zero, other])[0]
    assert math.isnan(pair.cosine) and math.isnan(pair.column_share[0]) and pair.column_share[1] == 0.0
    result = run("similarity", zero, other)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[2].split()[-2:] == ["n/a", "n/a"]
    assert "0.0000" not in result.output and f"{zero}: its delta is zero" in result.output
    out = tmp_path / "interference.json"
    result = run("interference", zero, other, "-o", out)
    assert result.exit_code == 0, result.output
    assert "cosine n/a" in result.output and "chance n/a" in result.output and "its delta is zero" in result.output
    assert "overlap most in" not in result.output  # every module's part is n/a: none overlaps more
    text = out.read_text()
    assert "NaN" not in text
    assert json.loads(text)["pairs"][0]["cosine"] is None


def test_inspect_shows_the_training_runs_and_the_layers_in_order():
    """adapters/README.md says `inspect` shows the vectors' training records: it showed only the
    recipe, as "1·positive run + -1·negative run", and listed layers.10 before layers.2."""
    shipped = Path(__file__).resolve().parents[1] / "adapters" / "helpful"
    result = run("inspect", shipped)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "recipe      svd: 1·positive run − 1·negative run" in lines
    assert any(line.startswith("training    negative (swapped): xstest_safe_pairs.jsonl, general_pairs.jsonl; 335 pairs, 30 steps") for line in lines)
    assert any(line.startswith("            positive: xstest_safe_pairs.jsonl") for line in lines)
    layers = [int(line.split(".")[2]) for line in lines if line.startswith("model.layers.")]
    assert layers == sorted(layers) and len(layers) == 210
    from lora_arith.cli.adapter_commands import _training_lines  # records of other shapes read as well

    assert _training_lines({"data": [{"hub_dataset": "org/ds"}]}) == ["run: org/ds"]
    one = {"data": [{"spec": "refusal:../d/a.jsonl", "file": "a.jsonl"}], "pairs": {"used": 1}, "training": {"steps": 1}}
    assert _training_lines(one) == ["run: refusal:a.jsonl; 1 pair, 1 step"]
