"""Hostile or careless inputs (issue 11, §3, §4, §7, §8, §9): numbers that overflow, malformed
factors and configs, wrong bases, pickles, odd Hub references, unbounded prompts and norms,
and Unicode line breaks. Each case is a one-line error (or, for valid input, success), never
a traceback and never NaN or Inf written with exit status 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import load_base, make_adapter
from safetensors.torch import load_file, save_file

from lora_arith.cli import main
from lora_arith._internal.errors import LoraArithError

Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.0.self_attn.v_proj"


PROGRESS = "Loading weights"  # transformers' progress bar on stderr, not an error line


def run(*args, **kwargs):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, **kwargs)


def assert_user_error(result, *fragments: str):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith(PROGRESS)]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def write_adapter(
    folder: Path,
    *,
    config: dict | None = None,
    rank: int = 4,
    shape: tuple[int, int] = (32, 32),
    value: float | None = None,
    tensors: dict | None = None,
    modules: tuple[str, ...] = (Q, V),
) -> Path:
    """A PEFT adapter folder written by hand (no model needed): random factors for ``modules``
    of the tiny Llama, or exactly ``tensors``; ``config`` entries override the defaults."""
    folder.mkdir(parents=True, exist_ok=True)
    if tensors is None:
        generator = torch.Generator().manual_seed(len(str(folder)))
        tensors = {}
        for module in modules:
            B = torch.randn(shape[0], rank, generator=generator)
            A = torch.randn(rank, shape[1], generator=generator)
            if value is not None:
                B, A = torch.full_like(B, value), torch.full_like(A, value)
            tensors[f"base_model.model.{module}.lora_B.weight"] = B
            tensors[f"base_model.model.{module}.lora_A.weight"] = A
    save_file(tensors, folder / "adapter_model.safetensors")
    settings = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": ["q_proj", "v_proj"],
    }
    settings.update(config or {})
    (folder / "adapter_config.json").write_text(json.dumps(settings))
    return folder


# -- §3 non-finite results --------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), 1e300])
@pytest.mark.parametrize("command", ["combine", "extract", "export"])
def test_non_finite_or_overflowing_alpha_is_refused(tmp_path, alpha, command):
    bad = write_adapter(tmp_path / "bad", config={"lora_alpha": alpha})
    good = write_adapter(tmp_path / "good")
    out = tmp_path / "out"
    args = {"combine": [bad], "extract": [bad, good], "export": [bad]}[command]
    result = run(command, *args, "-o", out)
    assert_user_error(result, "lora_alpha")
    assert not out.exists()


def test_weight_that_overflows_fp32_is_refused(tmp_path):
    adapter = write_adapter(tmp_path / "a")
    out = tmp_path / "out.safetensors"
    result = run("combine", f"{adapter}:1e39", "-o", out)
    assert_user_error(result, f"module {Q}", "too large")
    assert not out.exists()


@pytest.mark.parametrize("method, weight", [("cat", "1e5"), ("svd", "1e12")])
def test_fp16_overflow_is_refused_and_names_the_module(tmp_path, method, weight):
    # scaling 2: every B value is 2, so cat's B is 2e5; svd balances the factors (√ of the singular values)
    adapter = write_adapter(tmp_path / "a", value=1.0)
    out = tmp_path / "out"
    result = run("combine", f"{adapter}:{weight}", "--method", method, "--dtype", "fp16", "-o", out)
    assert_user_error(result, "overflows fp16", "; use --dtype fp32 or bf16", "module model.layers.0.self_attn.")
    assert not out.exists()
    # the same weight fits bf16, whose range is fp32's
    result = run("combine", f"{adapter}:{weight}", "--method", method, "--dtype", "bf16", "-o", out)
    assert result.exit_code == 0, result.output
    assert all(torch.isfinite(t).all() for t in load_file(out / "adapter_model.safetensors").values())


def test_export_refuses_a_scaling_that_overflows_the_adapters_fp16(tmp_path):
    tensors = {
        f"base_model.model.{Q}.lora_B.weight": torch.ones(32, 4, dtype=torch.float16),
        f"base_model.model.{Q}.lora_A.weight": torch.ones(4, 32, dtype=torch.float16),
    }
    adapter = write_adapter(tmp_path / "half", tensors=tensors, config={"lora_alpha": 4e5})  # scaling 1e5
    out = tmp_path / "out"
    assert_user_error(run("export", adapter, "-o", out), f"module {Q} overflows fp16", "convert it to fp32")
    assert not out.exists()


def test_generate_refuses_an_adapter_that_gives_nan_logits(chat_base, tmp_path):
    adapter = make_adapter(chat_base, tmp_path / "nan", r=2, lora_alpha=4, target_modules=["q_proj"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["lora_alpha"] = float("nan")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    result = run("generate", "--base", chat_base, "--adapter", adapter, "--max-new-tokens", "2", "Hello")
    assert_user_error(result, "lora_alpha", "not a finite number")


@pytest.mark.parametrize("weight, fragment", [("1e39", "overflows fp32"), ("1e36", "logits are NaN or Inf")])
def test_generate_refuses_a_weight_that_overflows_the_model_dtype(two_adapters, chat_base, weight, fragment):
    # 1e39 overflows the factors themselves (refused before the model runs); 1e36 fits them but
    # overflows the activations, which the logits show
    helpful, _ = two_adapters
    result = run("generate", "--base", chat_base, "--adapter", f"{helpful}:{weight}", "--max-new-tokens", "2", "Hi")
    assert_user_error(result, fragment)


def test_mixer_set_refuses_nan_weights(two_adapters, chat_base):
    from lora_arith.model.mixing import PreferenceMixer

    helpful, _ = two_adapters
    mixer = PreferenceMixer(str(chat_base), {"helpful": helpful}, device="cpu")
    with pytest.raises(LoraArithError, match="not a finite number"):
        mixer.set(helpful=float("nan"))
    assert mixer.weights == {"helpful": 1.0}


@pytest.mark.parametrize("grid", ["0,nan", "inf", "-1,-inf,1"])
def test_sweep_grid_must_be_finite(grid):
    from lora_arith.evaluation.sweep import parse_grid

    with pytest.raises(LoraArithError, match="not a finite number"):
        parse_grid(grid)


# -- §4 malformed factors ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8])
@pytest.mark.parametrize("factor", ["lora_A", "lora_B"])
def test_integer_factors_are_refused_naming_file_and_tensor(tmp_path, dtype, factor):
    tensors = {
        f"base_model.model.{Q}.lora_B.weight": torch.ones(32, 4),
        f"base_model.model.{Q}.lora_A.weight": torch.ones(4, 32),
    }
    key = f"base_model.model.{Q}.{factor}.weight"
    tensors[key] = tensors[key].to(dtype)
    adapter = write_adapter(tmp_path / "int", tensors=tensors)
    for command in (["inspect", adapter], ["combine", adapter, "-o", tmp_path / "out"]):
        result = run(*command)
        assert_user_error(result, "adapter_model.safetensors", key, "I32" if dtype == torch.int32 else "U8")
    assert not (tmp_path / "out").exists()


def test_module_stored_under_both_keys_is_refused(tmp_path):
    tensors = {
        f"base_model.model.{Q}.lora_B.weight": torch.ones(32, 4),
        f"base_model.model.{Q}.lora_A.weight": torch.ones(4, 32),
        f"{Q}.lora_B.weight": torch.full((32, 4), 2.0),
    }
    adapter = write_adapter(tmp_path / "twice", tensors=tensors)
    result = run("combine", adapter, "-o", tmp_path / "out")
    assert_user_error(result, "stored twice", f"base_model.model.{Q}.lora_B.weight", f"{Q}.lora_B.weight")


@pytest.mark.parametrize("targets", [[], None, "missing"])
def test_output_of_input_without_target_modules_loads_in_peft(adapter_factory, tiny_llama, tmp_path, targets):
    from peft import PeftModel

    adapter = adapter_factory("a", target_modules=["q_proj", "v_proj", "down_proj"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    if targets == "missing":
        del config["target_modules"]
    else:
        config["target_modules"] = targets
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert run("combine", f"{adapter}:2", "-o", out).exit_code == 0
    written = json.loads((out / "adapter_config.json").read_text())
    assert written["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    model = PeftModel.from_pretrained(load_base(tiny_llama), out)
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    expected = load_file(out / "adapter_model.safetensors")
    assert len(loaded) == len(expected) == 2 * 2 * 3  # 2 layers × 3 modules × (A, B)
    for key, tensor in expected.items():
        assert torch.equal(loaded[key.replace(".weight", ".default.weight")], tensor)


# -- §7 one-line errors instead of tracebacks ------------------------------------------------


def test_generate_with_an_adapter_folder_whose_name_has_a_dot(two_adapters, chat_base, tmp_path):
    import shutil

    helpful, _ = two_adapters
    dotted = tmp_path / "runs" / "mix-0.5"
    shutil.copytree(helpful, dotted)
    result = run("generate", "--base", chat_base, "--adapter", f"{dotted}:0.5", "--max-new-tokens", "2", "Hi")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("option", ["--batch-size", "--max-new-tokens"])
def test_zero_batch_size_is_a_usage_error(chat_base, option):
    result = run("generate", "--base", chat_base, option, "0", "Hi")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"Invalid value for '{option}'" in result.output


def test_generate_library_refuses_zero_batch_size(chat_base):
    from lora_arith.model.base import load_base as load
    from lora_arith.model.generation import generate

    model, tokenizer = load(str(chat_base), quantize_4bit=False, device="cpu")
    with pytest.raises(LoraArithError, match="at least 1"):
        generate(model, tokenizer, ["Hi"], batch_size=0, max_new_tokens=2)


def test_non_utf8_config_is_a_one_line_error(tmp_path):
    adapter = write_adapter(tmp_path / "a")
    (adapter / "adapter_config.json").write_bytes(b'{"r": 4, "lora_alpha": 8, "x": "\xff\xfe"}')
    assert_user_error(run("inspect", adapter), "adapter_config.json")


def test_non_utf8_prompt_and_eval_files_are_one_line_errors(chat_base, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(b'{"prompt": "caf\xe9"}\n')
    assert_user_error(run("generate", "--base", chat_base, "--prompts", prompts), "not UTF-8")
    result = run("eval", "--base", chat_base, "--prompts", prompts, "-o", tmp_path / "ev")
    assert_user_error(result, "not UTF-8")


def test_non_utf8_data_file_is_a_one_line_error(tmp_path):
    from lora_arith.training.data import load_pairs

    data = tmp_path / "pairs.jsonl"
    data.write_bytes(b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(LoraArithError, match="not UTF-8"):
        load_pairs([str(data)])


@pytest.mark.parametrize(
    "pattern, fragment",
    [
        ({"q_proj": "big"}, "not a finite number"),
        ({"q_proj": True}, "not a finite number"),
        ({"q_proj": float("nan")}, "not a finite number"),
        (["q_proj", 8], "must be a JSON object"),
        ({"q_proj(": 8}, "not a valid regular expression"),
    ],
)
@pytest.mark.parametrize("field", ["alpha_pattern", "rank_pattern"])
def test_malformed_patterns_are_one_line_errors(tmp_path, field, pattern, fragment):
    adapter = write_adapter(tmp_path / "a", config={field: pattern})
    assert_user_error(run("inspect", adapter), field, fragment)


MALFORMED = {  # valid JSON objects of the wrong shape: KeyError/AttributeError/format errors in inspect and the model card before
    "lora_arith.recipe": [
        '{"method": "cat", "inputs": [{"path": "a", "sha256": "0"}]}',
        '{"method": "cat", "inputs": [{"path": "a", "weight": "x", "sha256": "0"}]}',
        '{"method": "cat", "inputs": {"path": "a"}}',
        '{"method": "cat", "inputs": [5]}',
        '{"method": "svd", "rank": "high", "inputs": []}',
    ],
    "lora_arith.training": ['{"data": [5]}', '{"data": [], "hyperparameters": [1, 2]}', '{"positive": {"data": "x"}}'],
}


@pytest.mark.parametrize("key, raw", [(key, raw) for key, raws in MALFORMED.items() for raw in raws])
def test_metadata_blocks_of_the_wrong_shape_are_one_line_errors(tmp_path, key, raw):
    test_malformed_metadata_blocks_are_one_line_errors(tmp_path, key, raw, fragment="malformed")


@pytest.mark.parametrize("raw", ["{not json", "[1, 2]", '"text"'])
@pytest.mark.parametrize("key", ["lora_arith.recipe", "lora_arith.training", "lora_arith.adapter_config"])
def test_malformed_metadata_blocks_are_one_line_errors(tmp_path, key, raw, fragment=None):
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    metadata = {"format": "pt", "lora_arith.adapter_config": json.dumps(config), key: raw}
    tensors = {
        f"base_model.model.{Q}.lora_B.weight": torch.ones(32, 4),
        f"base_model.model.{Q}.lora_A.weight": torch.ones(4, 32),
    }
    path = tmp_path / "single.safetensors"
    save_file(tensors, path, metadata=metadata)
    fragments = ["embedded LoRA config"] if key == "lora_arith.adapter_config" else [key, *([fragment] if fragment else [])]
    for command in (["inspect", path], ["combine", path, "-o", tmp_path / "out"], ["push", path, "me/x", "--dry-run"],
                    ["convert", path, "-o", tmp_path / "folder"]):  # fmt: skip
        assert_user_error(run(*command), *fragments)


def test_shape_mismatch_across_inputs_is_a_one_line_error(tmp_path):
    small = write_adapter(tmp_path / "small", shape=(32, 32))
    large = write_adapter(tmp_path / "large", shape=(64, 32))
    assert_user_error(run("similarity", small, large), Q, "different shapes")
    assert_user_error(run("interference", small, large), Q, "different shapes")  # was a ValueError traceback
    assert_user_error(run("combine", small, large, "--method", "svd", "-o", tmp_path / "o"), Q, "shape")
    assert_user_error(run("combine", small, large, "-o", tmp_path / "o"), Q, "shape")


def test_generate_with_an_adapter_for_another_base(adapter_factory, chat_base):
    other = adapter_factory("other")  # for the tiny Llama with hidden size 32; chat_base has 64
    result = run("generate", "--base", chat_base, "--adapter", other, "--max-new-tokens", "2", "Hi")
    assert_user_error(result, "another base", "in the base model")


def test_generate_with_an_adapter_for_another_architecture(tiny_gpt2, chat_base, tmp_path):
    other = make_adapter(tiny_gpt2, tmp_path / "gpt2", target_modules=["c_attn"], fan_in_fan_out=True)
    result = run("generate", "--base", chat_base, "--adapter", other, "--max-new-tokens", "2", "Hi")
    assert_user_error(result, "PEFT cannot attach this adapter", "c_attn")


def test_mixer_leaves_the_model_untouched_when_an_adapter_does_not_fit(adapter_factory, chat_base):
    from lora_arith.model.mixing import attach_adapter

    model = load_base(chat_base)
    with pytest.raises(LoraArithError, match="another base"):
        attach_adapter(model, "other", adapter_factory("other"))
    assert not any("lora_" in name for name, _ in model.named_parameters())


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.ckpt"])
def test_pickle_base_is_refused_without_loading_it(chat_base, tmp_path, monkeypatch, name):
    import shutil

    folder = tmp_path / "pickled"
    folder.mkdir()
    for item in chat_base.iterdir():
        if item.suffix != ".safetensors":
            shutil.copy(item, folder / item.name)
    torch.save(load_base(chat_base).state_dict(), folder / name)

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.load was called on a pickle")

    monkeypatch.setattr(torch, "load", forbidden)
    assert_user_error(run("generate", "--base", folder, "Hi"), "pickle")
    assert_user_error(run("generate", "--base", folder / name, "Hi"), "pickle")


@pytest.mark.parametrize(
    "reference",
    ["org/name/../../x.safetensors", "org/name/sub/../../../x", "org/name@../../x.safetensors", "org/name//x"],
)
def test_hub_references_with_dot_dot_are_refused(tmp_path, monkeypatch, reference):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert_user_error(run("combine", reference, "-o", tmp_path / "out"), "not a valid Hub reference")
    assert_user_error(run("inspect", reference), "not a valid Hub reference")


@pytest.mark.parametrize("how", ["offline", "unreachable"])
def test_push_without_network_is_a_one_line_error(tmp_path, monkeypatch, how):
    adapter = write_adapter(tmp_path / "a")
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    if how == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    code = textwrap.dedent(
        """
        import sys
        from lora_arith.cli import main
        sys.argv = ["lora-arith", "push", sys.argv[1], "me/x"]
        main()
        """
    )
    # a fresh process, so that huggingface_hub reads the environment above at import time
    done = subprocess.run(
        [sys.executable, "-c", code, str(adapter)], capture_output=True, text=True, timeout=120, env=os.environ.copy()
    )
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: upload to me/x failed"), done.stderr


# -- §8 bounded resources --------------------------------------------------------------------


def test_prompt_longer_than_the_context_is_refused_before_the_model_runs(chat_base, tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    prompts = tmp_path / "p.jsonl"
    long_prompt = "bread " * 2000  # chat_base has a context of 512 positions
    prompts.write_text(json.dumps({"prompt": "Hi"}) + "\n" + json.dumps({"prompt": long_prompt}) + "\n")

    def forbidden(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr(LlamaForCausalLM, "forward", forbidden)
    result = run("generate", "--base", chat_base, "--prompts", prompts, "--max-new-tokens", "2")
    assert_user_error(result, f"{prompts}:2", "tokens", "context of 512")
    # the limit counts the new tokens too
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"prompt": "bread " * 200}) + "\n")
    result = run("generate", "--base", chat_base, "--prompts", short, "--max-new-tokens", "500")
    assert_user_error(result, f"{short}:1", "500 new tokens")


def test_a_megabyte_prompt_is_refused_without_tokenizing_it(chat_base, tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    tokenize = PreTrainedTokenizerFast.__call__

    def bounded(self, text, *args, **kwargs):
        assert len(str(text)) < 100_000, "a megabyte prompt was tokenized"
        return tokenize(self, text, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerFast, "__call__", bounded)
    monkeypatch.setattr(LlamaForCausalLM, "forward", lambda *a, **k: pytest.fail("the model ran"))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "bread " * 200_000}) + "\n")
    result = run("generate", "--base", chat_base, "--prompts", prompts, "--max-new-tokens", "2")
    assert_user_error(result, f"{prompts}:1", "1200", "characters, at least", "context is 512 tokens")


@pytest.mark.parametrize(
    "line, fragment",
    [
        ('{"prompt": 123}', "prompt must be"),
        ('{"prompt": ""}', "empty prompt"),
        ('{"prompt": [{"role": "user"}]}', "content"),
        ('{"text": "hi"}', "'prompt'"),
        ("[1, 2]", "'prompt'"),
        ("{broken", "invalid JSON"),
        ('{"prompt": ' + "[" * 100_000, "invalid JSON (nested too deeply)"),
        ('{"prompt": "hi", "n": ' + "9" * 5000 + "}", "invalid JSON (Exceeds the limit (4300 digits)"),
        ('{"prompt": "hi", "weights": {"nope": 1}}', "no adapter named nope; attached: helpful"),
        ('{"prompt": "hi", "weights": {"helpful": "x"}}', "the weight of helpful is not a finite number"),
        ('{"prompt": "hi", "weights": {"helpful": NaN}}', "the weight of helpful is not a finite number"),
    ],
    ids=["number", "empty", "no-content", "no-prompt", "list", "broken", "deep", "long-int", "unknown-name", "text-weight", "nan-weight"],
)
def test_every_prompt_line_is_checked_before_any_model_loads(tmp_path, monkeypatch, line, fragment):
    import lora_arith.model.base

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(lora_arith.model.base, "load_base", forbidden)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "fine"}\n\n{"prompt": "also fine", "weights": {"helpful": 0.5}}\n' + line + "\n")
    helpful = Path(__file__).resolve().parent.parent / "adapters" / "helpful"
    assert_user_error(run("generate", "--prompts", prompts, "--adapter", helpful), f"{prompts}:4", fragment)


def test_empty_prompts_file_is_an_error(tmp_path, monkeypatch):
    import lora_arith.model.base

    monkeypatch.setattr(lora_arith.model.base, "load_base", lambda *a, **k: pytest.fail("a model was loaded"))
    prompts = tmp_path / "p.jsonl"
    for text in ("", "\n  \n"):
        prompts.write_text(text)
        assert_user_error(run("generate", "--prompts", prompts), "no prompts")


def test_eval_prompt_with_bad_type_fails_before_the_model(tmp_path, monkeypatch):
    import lora_arith.model.base

    monkeypatch.setattr(lora_arith.model.base, "load_base", lambda *a, **k: pytest.fail("a model was loaded"))
    prompts = tmp_path / "e.jsonl"
    prompts.write_text('{"prompt": "ok", "should_refuse": false}\n{"prompt": 5, "should_refuse": true}\n')
    assert_user_error(run("eval", "--prompts", prompts, "-o", tmp_path / "ev"), f"{prompts}:2", "prompt must be")


@pytest.mark.parametrize(
    "line, fragment",
    [
        ('{"prompt": "ok", "should_refuse": true, "type": ["a"]}', "'type' must be text"),
        ('{"prompt": "ok", "should_refuse": true, "type": 3}', "'type' must be text"),
        ('{"prompt": ' + "[" * 100_000, "invalid JSON (nested too deeply)"),
    ],
    ids=["list-type", "int-type", "deep"],
)
def test_eval_prompt_lines_of_the_wrong_shape_fail_before_the_model(tmp_path, monkeypatch, line, fragment):
    import lora_arith.model.base

    monkeypatch.setattr(lora_arith.model.base, "load_base", lambda *a, **k: pytest.fail("a model was loaded"))
    prompts = tmp_path / "e.jsonl"
    prompts.write_text('{"prompt": "ok", "should_refuse": false, "type": "safe"}\n' + line + "\n")
    assert_user_error(run("eval", "--prompts", prompts, "-o", tmp_path / "ev"), f"{prompts}:2: {fragment}")


def test_inspect_norms_of_a_rank_8000_adapter_stay_within_memory(tmp_path):
    """The r×r Gram matrices of a rank-8000 module take 512 MB each in fp64; blocked, the norm
    needs about the size of the factors. Run under an address-space limit 400 MB above start-up."""
    rank, size = 8000, 64
    generator = torch.Generator().manual_seed(0)
    B, A = torch.randn(size, rank, generator=generator), torch.randn(rank, size, generator=generator)
    adapter = write_adapter(
        tmp_path / "wide",
        rank=rank,
        config={"lora_alpha": rank},
        tensors={f"base_model.model.{Q}.lora_B.weight": B, f"base_model.model.{Q}.lora_A.weight": A},
    )
    expected = float(torch.linalg.matrix_norm((B.double() @ A.double())))
    code = textwrap.dedent(
        """
        import resource, sys
        from lora_arith.lora.adapter_io import open_adapter
        from lora_arith.lora.analysis import module_norms
        opened = open_adapter(sys.argv[1])
        with open("/proc/self/status") as status:
            vm = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (vm + (400 << 20), resource.RLIM_INFINITY))
        print(repr(next(iter(module_norms(opened).values()))))
        """
    )
    done = subprocess.run([sys.executable, "-c", code, str(adapter)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout) == pytest.approx(expected, rel=1e-9)


def test_blocked_inner_product_matches_the_dense_one():
    from lora_arith.lora.factors import LowRankDelta, inner

    generator = torch.Generator().manual_seed(1)
    for out_features, in_features, r1, r2 in [(40, 30, 3, 5), (20, 16, 400, 300), (300, 2, 700, 1), (8, 600, 2, 90)]:
        a = LowRankDelta(
            torch.randn(out_features, r1, generator=generator), torch.randn(r1, in_features, generator=generator)
        )
        b = LowRankDelta(
            torch.randn(out_features, r2, generator=generator), torch.randn(r2, in_features, generator=generator)
        )
        dense = float(((a.B.double() @ a.A.double()) * (b.B.double() @ b.A.double())).sum())
        assert inner(a, b) == pytest.approx(dense, rel=1e-10)
        squared = float((a.B.double() @ a.A.double()).square().sum())
        assert inner(a, a) == pytest.approx(squared, rel=1e-10)


def test_chat_reports_a_conversation_longer_than_the_context_and_goes_on(chat_base):
    script = "bread " * 600 + "\nHi\n/quit\n"
    result = run("chat", "--base", chat_base, "--max-new-tokens", "2", input=script)
    assert result.exit_code == 0, result.output
    assert "Error: " in result.output and "context of 512" in result.output
    assert "assistant:" in result.output.split("context of 512", 1)[1]


# -- §9 Unicode line breaks inside JSON strings ----------------------------------------------


@pytest.mark.parametrize("separator", ["\u2028", "\u0085", "\u2029"])
def test_prompt_files_split_on_newline_only(chat_base, tmp_path, separator):
    from lora_arith.evaluation.evaluate import load_eval_prompts

    prompt = f"first{separator}second"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": prompt}, ensure_ascii=False) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    result = run("generate", "--base", chat_base, "--prompts", prompts, "--max-new-tokens", "2", "--out", out)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").split("\n") if line]
    assert [row["prompt"] for row in rows] == [prompt]

    evals = tmp_path / "e.jsonl"
    evals.write_text(json.dumps({"prompt": prompt, "should_refuse": False}, ensure_ascii=False) + "\n", "utf-8")
    assert [item.prompt for item in load_eval_prompts([evals])] == [prompt]


def _separated_rows(tmp_path: Path, separator: str) -> tuple[dict, Path]:
    row = {"prompt": f"a{separator}b", "chosen": f"yes{separator}indeed", "rejected": "no"}
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps(row, ensure_ascii=False) + "\r\n" + json.dumps(row, ensure_ascii=False), "utf-8")
    return row, data


@pytest.mark.parametrize("separator", ["\u2028", "\u0085"])
def test_data_files_split_on_newline_only(tmp_path, separator):
    """(The pair loader already read files line by line; this keeps it so.)"""
    from lora_arith.training.data import load_pairs

    row, data = _separated_rows(tmp_path, separator)
    pairs, _ = load_pairs([str(data)])
    assert [(p.prompt, p.chosen) for p in pairs] == [(row["prompt"], row["chosen"])] * 2


@pytest.mark.parametrize("separator", ["\u2028", "\u0085"])
def test_the_one_jsonl_reader_numbers_lines_split_on_newline_only(tmp_path, separator):
    from lora_arith.training.data import read_jsonl

    row, data = _separated_rows(tmp_path, separator)
    assert list(read_jsonl(data)) == [(1, row), (2, row)]


def test_a_path_too_long_for_the_file_system_is_a_one_line_error(tmp_path):
    """``Path.exists()`` raises ENAMETOOLONG for a 300-character name: a traceback before."""
    from lora_arith.lora.adapter_io import open_adapter

    long = "x" * 300
    good = write_adapter(tmp_path / "good")
    assert_user_error(run("inspect", long), "File name too long")
    assert_user_error(run("combine", good, long, "-o", tmp_path / "out"), "File name too long")
    assert_user_error(run("combine", good, "-o", tmp_path / long), "File name too long")
    with pytest.raises(LoraArithError, match="File name too long"):
        open_adapter(long)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "option, fragment",
    [
        (["--limit", "-1"], "--limit must be a whole number of at least 1, got -1"),  # dropped the last prompt
        (["--limit", "0"], "--limit must be a whole number of at least 1, got 0"),  # evaluated nothing, exit 0
        (["--max-pairs", "0"], "--max-pairs must be a whole number of at least 1, got 0"),
        (["--beta", "nan"], "--beta must be a positive finite number, got nan"),
        (["--beta", "-1"], "--beta must be a positive finite number, got -1.0"),
    ],
    ids=["limit-negative", "limit-zero", "max-pairs-zero", "beta-nan", "beta-negative"],
)
def test_eval_counts_and_beta_are_checked_before_the_base_loads(tmp_path, monkeypatch, option, fragment):
    import lora_arith.model.base

    monkeypatch.setattr(lora_arith.model.base, "load_base", lambda *a, **k: pytest.fail("a model was loaded"))
    prompts = tmp_path / "e.jsonl"
    prompts.write_text('{"prompt": "ok", "should_refuse": false}\n{"prompt": "no", "should_refuse": true}\n')
    assert_user_error(run("eval", "--prompts", prompts, "-o", tmp_path / "ev", *option), fragment)


def test_library_eval_settings_are_checked_when_built():
    from lora_arith import EvalConfig
    from lora_arith.evaluation.config import load_inputs

    for settings in ({"beta": 0}, {"beta": float("inf")}, {"batch_size": 0}, {"max_new_tokens": 2.5}):
        with pytest.raises(LoraArithError, match=next(iter(settings))):
            EvalConfig(**settings)
    with pytest.raises(LoraArithError, match="max_pairs must be a whole number"):
        load_inputs(pairs=[], prompts=[], max_pairs=-1)


def test_vector_rank_zero_is_a_usage_error_not_the_default(tmp_path):
    result = run("vector", "--data", tmp_path / "p.jsonl", "--method", "svd", "--vector-rank", "0", "-o", tmp_path / "v.safetensors")
    assert result.exit_code == 2 and "'--vector-rank': 0 is not in the range x>=1" in result.output


def test_eval_reads_pku_pairs_with_the_label_its_error_names(tmp_path, monkeypatch):
    """The error for PKU-SafeRLHF pairs without a label asked for --label, which eval lacked."""
    from lora_arith.evaluation.config import EvalConfig, load_inputs

    monkeypatch.setattr(EvalConfig, "mixer", lambda *a, **k: pytest.fail("a model was loaded"))
    record = {"prompt": "How do I stay safe?", "response_0": "Zero.", "response_1": "One.",
              "better_response_id": 0, "safer_response_id": 1}  # fmt: skip
    pku = tmp_path / "pku.jsonl"
    pku.write_text(json.dumps(record) + "\n")
    for command in ("eval", "sweep", "tune"):
        assert "--label [harmless|helpful]" in run(command, "--help").output
    result = run("eval", "--pairs", pku, "-o", tmp_path / "ev")
    assert_user_error(result, "need a label: --label helpful or --label harmless")
    (pair,) = load_inputs(pairs=[pku], label="harmless").pairs
    assert (pair.chosen, pair.rejected) == ("One.", "Zero.")
    (pair,) = load_inputs(pairs=pku, label="helpful").pairs
    assert (pair.chosen, pair.rejected) == ("Zero.", "One.")


@pytest.mark.parametrize("base", [5, ["a"], {"x": 1}])
def test_a_config_whose_base_is_not_text_is_a_one_line_error(adapter_factory, tmp_path, base):
    adapter = adapter_factory()
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    for command in (["combine", adapter, "-o", tmp_path / "out"], ["convert", adapter, "-o", tmp_path / "c.safetensors"]):
        assert_user_error(run(*command), "base_model_name_or_path in the config is")


def test_extract_of_one_adapter_given_twice_is_refused(adapter_factory, tmp_path):
    """POS == NEG (or a folder and its own weights file) wrote an all-zero vector and exit 0."""
    import lora_arith

    adapter = adapter_factory()
    for negative in (adapter, adapter / "adapter_model.safetensors"):
        assert_user_error(run("extract", adapter, negative, "-o", tmp_path / "phi"), "are the same adapter")
        with pytest.raises(LoraArithError, match="are the same adapter"):
            lora_arith.extract(adapter, negative)
    assert not (tmp_path / "phi").exists()


def test_prompts_that_are_not_utf8_are_one_line_errors(chat_base, tmp_path):
    """Bytes that are not UTF-8 on the command line (lone surrogates after Python decodes argv)
    and a lone surrogate escaped in JSON were TypeErrors inside the tokenizer."""
    from lora_arith.serving.completions import generate_completions

    with pytest.raises(LoraArithError, match="PROMPT: the prompt is not valid UTF-8 text \\(it holds '\\\\udcff'\\)"):
        generate_completions(str(chat_base), {}, ["hi \udcff there"], sources=["PROMPT"], max_new_tokens=2)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "fine"}\n{"prompt": "bad \\ud800 one"}\n')
    result = run("generate", "--base", chat_base, "--prompts", prompts, "--max-new-tokens", "2")
    assert_user_error(result, f"{prompts}:2: the prompt is not valid UTF-8 text")
    # chat says so and goes on (stdin decodes bytes that are not UTF-8 to lone surrogates)
    command = [sys.executable, "-m", "lora_arith", "chat", "--base", str(chat_base), "--max-new-tokens", "2"]
    chat = subprocess.run(command, input=b"hi \xff\nhello\n/quit\n", capture_output=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8:surrogateescape"})  # fmt: skip
    output = chat.stdout.decode() + chat.stderr.decode()
    assert chat.returncode == 0 and "not valid UTF-8 text" in output and "Traceback" not in output, output
    assert chat.stdout.decode(errors="replace").count("assistant: ") == 1, "the next line got its reply"


@pytest.mark.parametrize("name", [5, "", "h.1"])
def test_mixer_names_are_checked_before_the_base_loads(monkeypatch, adapter_factory, name):
    """A number gave PEFT's "'in <string>' requires string", a dot torch's ModuleDict KeyError."""
    import lora_arith.model.base
    from lora_arith.model.mixing import PreferenceMixer

    monkeypatch.setattr(lora_arith.model.base, "load_base", lambda *a, **k: pytest.fail("the base loaded"))
    with pytest.raises(LoraArithError, match="an adapter's name must be text without '.'"):
        PreferenceMixer(None, {name: str(adapter_factory())})


def test_library_prompt_weights_name_the_prompt_counting_from_one(monkeypatch):
    import lora_arith.model.base
    from lora_arith.lora.specs import AdapterSpec
    from lora_arith.serving.completions import generate_completions

    monkeypatch.setattr(lora_arith.model.base, "load_base", lambda *a, **k: pytest.fail("a model was loaded"))
    helpful = AdapterSpec(Path(__file__).resolve().parent.parent / "adapters" / "helpful")
    with pytest.raises(LoraArithError, match="^prompt 2: no adapter named harmless; attached: helpful$"):
        generate_completions(None, {"helpful": helpful}, ["hi", "yo"], [None, {"harmless": 1}])
