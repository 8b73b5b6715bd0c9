"""DPO training of LoRA adapters (lora_arith.training.train), its CLI command, and base-model loading."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import PAIRS, dense_patched_model, logits
from helpers import load_base as load_tiny
from safetensors import safe_open
from safetensors.torch import load_file

import lora_arith.cli.train_commands  # noqa: F401  (registers ``train`` on ``main``)
from lora_arith.model.base import (
    DEFAULT_BASE_ID,
    base_model_id,
    cache_root,
    load_base,
    resolve_base,
)
from lora_arith.cli import main
from lora_arith.training.data import load_pairs
from lora_arith._internal.devices import use_bf16
from lora_arith._internal.errors import LoraArithError
from lora_arith.lora.factors import single_threaded
from lora_arith.model.generation import chat_prompt
from lora_arith.training.train import (
    TrainConfig,
    _checkpointing_argument,
    _to_dataset,
    train_preference,
)

LOGGED = ("loss", "rewards/accuracies", "rewards/margins")
QUICK = {"max_steps": 2, "batch_size": 2, "grad_accum": 1, "max_length": 64, "rank": 4, "alpha": 8}


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Run this module's tiny models on one thread: they gain nothing from more, and on a busy
    machine every multi-threaded op waits for a descheduled worker thread (~20 ms each)."""
    with single_threaded():
        yield


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


# ---- training --------------------------------------------------------------------------------


def test_train_on_4bit_base_writes_adapter_log_and_metadata(chat_base, pairs_file, tmp_path):
    run = train_preference(TrainConfig(data=[str(pairs_file)], base=str(chat_base), **QUICK), tmp_path / "run")
    out = run.path
    assert out == tmp_path / "run"
    config = read_json(out / "adapter_config.json")
    assert config["base_model_name_or_path"] == chat_base.name  # a local base: its name, not its path
    assert config["r"] == 4 and config["lora_alpha"] == 8
    adapted = {name.rsplit(".", 1)[-1] for name in config["target_modules"]}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    with safe_open(run.single_file, framework="pt") as handle:  # built from memory, not read back
        assert json.loads(handle.metadata()["lora_arith.adapter_config"]) == config

    weights = load_file(out / "adapter_model.safetensors")
    assert weights and all(tensor.dtype == torch.float32 for tensor in weights.values())
    assert any(name.endswith("lora_B.weight") and tensor.abs().sum() > 0 for name, tensor in weights.items())

    log = read_json(out / "training_log.json")
    assert [entry["step"] for entry in log] == [1, 2]
    assert all(key in entry for entry in log for key in LOGGED)
    assert log[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # the adapter starts at zero: policy == reference

    info = read_json(out / "training_metadata.json")
    assert run.log == log and run.metadata == info  # the returned result is what was written
    assert info["data"] == [
        {
            "spec": pairs_file.name,
            "pairs": 4,
            "skipped": 0,
            "templated": False,
            "file": pairs_file.name,
            "sha256": hashlib.sha256(pairs_file.read_bytes()).hexdigest(),
        }
    ]
    assert info["swap"] is False and info["label"] is None
    assert info["base_model"] == chat_base.name
    assert info["hyperparameters"]["quantize_4bit"] is True
    assert info["hyperparameters"]["effective_batch_size"] == 2
    assert info["training"]["steps"] == 2
    assert {"torch", "transformers", "peft", "trl", "lora-arith"} <= set(info["versions"])
    assert info["wall_time_s"] > 0
    assert not list(tmp_path.glob(".run*")), "no temporary folder is left behind"

    from lora_arith.lora.adapter_io import open_adapter

    single = open_adapter(out / "run.safetensors")  # the single-file form, self-describing
    assert single.config["r"] == 4 and single.training["final_metrics"]["loss"] == log[-1]["loss"]
    assert single.training["data"][0]["sha256"] == info["data"][0]["sha256"]


def test_cli_trains_swapped_unquantized(chat_base, pairs_file, tmp_path):
    out = tmp_path / "neg"
    args = ["train", "--data", str(pairs_file), "-o", str(out), "--base", str(chat_base), "--swap", "--no-4bit"]
    args += ["--max-steps", "2", "--batch-size", "2", "--max-length", "64", "--rank", "2", "--no-bf16"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert f"wrote {out}: 4 pairs, 2 steps" in result.output
    # off a terminal (as here) no progress bar of the trainer's or of the tokenizing's: their
    # carriage returns fill a log; each step's metrics are printed instead (transformers' own
    # "Loading weights" bar follows HF_HUB_DISABLE_PROGRESS_BARS, which the CLI sets for a new
    # process: test_mixing.py::test_generate_writes_nothing_to_stderr_off_a_terminal)
    assert "| 1/2 [" not in result.output and "examples/s]" not in result.output, result.output
    assert result.output.count("'loss'") == 2
    info = read_json(out / "training_metadata.json")
    assert info["swap"] is True
    assert info["hyperparameters"]["quantize_4bit"] is False
    assert info["training"]["bf16_autocast"] is False
    assert read_json(out / "adapter_config.json")["r"] == 2
    assert all(key in read_json(out / "training_log.json")[-1] for key in LOGGED)


def test_cli_refuses_existing_output_unless_forced(chat_base, pairs_file, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")
    (out / "adapter_model.safetensors").write_bytes(b"")  # an earlier adapter: --force may replace it
    base = ["train", "--data", str(pairs_file), "-o", str(out), "--base", str(chat_base), "--no-4bit"]
    result = CliRunner().invoke(main, base + ["--max-steps", "1", "--warmup-ratio", "0"])
    assert result.exit_code == 1 and "exists" in result.output and "--force" in result.output
    result = CliRunner().invoke(main, base + ["--max-steps", "1", "--warmup-ratio", "0", "--batch-size", "2", "--max-length", "48", "--force"])
    assert result.exit_code == 0, result.output
    assert read_json(out / "adapter_config.json")["peft_type"] == "LORA"


def test_force_never_replaces_a_folder_that_is_not_an_adapter(pairs_file, tmp_path):
    keep = tmp_path / "precious"
    keep.mkdir()
    (keep / "notes.txt").write_text("keep me")
    with pytest.raises(LoraArithError, match="not an adapter folder"):
        train_preference(TrainConfig(data=[str(pairs_file)]), keep, force=True)
    assert (keep / "notes.txt").read_text() == "keep me"


def test_cli_option_conflicts(pairs_file, tmp_path):
    args = ["train", "--data", str(pairs_file), "-o", str(tmp_path / "x")]
    result = CliRunner().invoke(main, args + ["--epochs", "1", "--max-steps", "3"])
    assert result.exit_code == 1 and "either --epochs or --max-steps" in result.output
    result = CliRunner().invoke(main, args + ["--label", "honest"])
    assert result.exit_code == 2


def test_cli_help_documents_every_option():
    result = CliRunner().invoke(main, ["train", "--help"])
    assert result.exit_code == 0
    for option in ("--data", "--swap", "--label", "--rank", "--lr", "--max-length", "--no-4bit", "--force"):
        assert option in result.output


def test_unknown_target_module_is_a_user_error(chat_base, pairs_file, tmp_path):
    config = TrainConfig(data=[str(pairs_file)], base=str(chat_base), targets="q_proj,wq", quantize_4bit=False)
    with pytest.raises(LoraArithError, match="no module named wq"):
        train_preference(config, tmp_path / "x")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rank": 0}, "rank must be a whole number of at least 1, got 0"),
        ({"lr": -1.0}, "lr must be a positive finite number, got -1.0"),
        ({"max_steps": 0}, "max_steps must be a whole number of at least 1, got 0"),
        ({"dropout": 1.0}, "dropout"),
        ({"label": "honest"}, "unknown label"),
        ({"targets": " , "}, "targets is empty"),
        ({"sft_weight": -0.5}, "sft_weight must be 0 or a positive finite number, got -0.5"),
        ({"data": []}, "no data files"),
        ({"double_quant": True, "quantize_4bit": False}, "double_quant needs the 4-bit base"),
        # an infinite lr, alpha or beta trained an all-NaN adapter and exited 0; the others failed inside TRL
        ({"lr": float("inf")}, "lr must be a positive finite number, got inf"),
        ({"alpha": float("inf")}, "alpha must be a positive finite number, got inf"),
        ({"beta": float("nan")}, "beta must be a positive finite number, got nan"),
        ({"sft_weight": float("nan")}, "sft_weight must be 0 or a positive finite number, got nan"),
        ({"epochs": float("inf")}, "epochs must be a positive finite number, got inf"),
        ({"max_steps": 1.5}, "max_steps must be a whole number of at least 1, got 1.5"),
        ({"batch_size": "4"}, "batch_size must be a whole number of at least 1, got '4'"),
        ({"seed": -1}, "seed must be a whole number from 0"),
        ({"weight_decay": float("nan")}, "weight_decay must be 0 or a positive finite number, got nan"),
        # "no" is truthy: it turned 4-bit on; a list of ints is no module names
        ({"quantize_4bit": "no"}, "quantize_4bit must be True or False, not 'no'"),
        ({"bf16": 1}, "bf16 must be True or False, not 1"),
        ({"targets": [1, 2]}, "targets must be 'all-linear' or module names"),
    ],
)
def test_config_validation(change, message):
    with pytest.raises(LoraArithError, match=message):
        TrainConfig(**{"data": ["x.jsonl"], **change})


def test_data_is_one_spec_or_a_list_of_paths_or_texts():
    assert TrainConfig(data="pairs.jsonl").data == ["pairs.jsonl"]  # was read character by character
    assert TrainConfig(data=(Path("a.jsonl"), "refusal:b.jsonl")).data == ["a.jsonl", "refusal:b.jsonl"]
    with pytest.raises(TypeError, match="data: expected a path or a list of paths, not 5"):
        TrainConfig(data=5)


def test_valid_config_builds():
    assert TrainConfig(data=["x.jsonl"], targets=" q_proj, v_proj ").target_modules() == ["q_proj", "v_proj"]
    # as PEFT takes them (a list was an AttributeError), and one dpo_arg as a list of one (read per character)
    assert TrainConfig(data=["x.jsonl"], targets=["q_proj", "v_proj"]).target_modules() == ["q_proj", "v_proj"]
    assert TrainConfig(data=["x.jsonl"], dpo_arg="label_smoothing=0.1").dpo_arguments() == {"label_smoothing": 0.1}


def test_dpo_args_report_to_and_checkpointing_reach_dpo_config(tmp_path):
    from lora_arith.training.train import _dpo_args

    config = TrainConfig(
        data=["x.jsonl"], dpo_arg=["label_smoothing=0.25", "precompute_ref_log_probs=true", "loss_type=[\"ipo\"]"],
        report_to="tensorboard", gradient_checkpointing=True,
    )  # fmt: skip
    args = _dpo_args(config, tmp_path, "cpu")
    assert args.label_smoothing == 0.25 and args.precompute_ref_log_probs is True and args.loss_type == ["ipo"]
    assert args.report_to == ["tensorboard"]
    assert getattr(args, _checkpointing_argument(type(args))) is True
    defaults = _dpo_args(TrainConfig(data=["x.jsonl"]), tmp_path, "cpu")
    assert defaults.report_to in ("none", [], ["none"]) and getattr(defaults, _checkpointing_argument(type(args))) is False


def test_cli_unknown_dpo_arg_is_a_one_line_error(pairs_file, tmp_path):
    args = ["train", "--data", str(pairs_file), "-o", str(tmp_path / "x"), "--dpo-arg", "nonsense=1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and result.output == "Error: --dpo-arg 'nonsense' is not a DPOConfig argument\n"
    result = CliRunner().invoke(main, args[:-1] + ["beta"])
    assert result.exit_code == 1 and "is not KEY=VALUE" in result.output
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"dpo_arg": ['beta="x"']}, 'dpo_arg beta="x" is not of DPOConfig\'s type for it (float)'),
        ({"dpo_arg": ["beta=NaN"]}, "dpo_arg beta=NaN is not of DPOConfig's type"),
        ({"dpo_arg": ["max_length=1.5"]}, "dpo_arg max_length=1.5 is not of DPOConfig's type for it (int | None)"),
        ({"dpo_arg": ["precompute_ref_log_probs=1"]}, "is not of DPOConfig's type for it (bool)"),
        ({"dpo_arg": ["output_dir=elsewhere"]}, "dpo_arg 'output_dir' is set by lora-arith"),
        ({"dpo_arg": ["hub_model_id=me/x"]}, "dpo_arg 'hub_model_id' is set by lora-arith"),
    ],
)
def test_dpo_args_of_the_wrong_type_or_owned_by_us_are_refused(change, fragment):
    with pytest.raises(LoraArithError) as caught:
        TrainConfig(data=["x.jsonl"], **change)
    assert fragment in str(caught.value)


def test_dpo_arg_text_that_reads_as_json_goes_to_a_text_field():
    arguments = TrainConfig(data=["x.jsonl"], dpo_arg=["run_name=2024", "max_length=10000"]).dpo_arguments()
    assert arguments == {"run_name": "2024", "max_length": 10000}


@pytest.mark.parametrize(
    "option, fragment",
    [
        (["--lr-scheduler", "bogus"], "bogus is not a valid SchedulerType"),
        (["--report-to", "bogus"], "bogus is not supported"),
        (["--dpo-arg", "lr_scheduler_type=bogus"], "bogus is not a valid SchedulerType"),
    ],
)
def test_settings_transformers_refuses_are_one_line_errors_before_the_base_loads(pairs_file, tmp_path, monkeypatch, option, fragment):
    import lora_arith.model.base as base

    monkeypatch.setattr(base, "load_base", lambda *a, **k: pytest.fail("the base loaded"))
    args = ["train", "--data", str(pairs_file), "-o", str(tmp_path / "x"), *option]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert result.output.startswith("Error: the training settings are refused by transformers or TRL: " + fragment)
    assert not (tmp_path / "x").exists()


def test_config_fields_all_have_help():
    from dataclasses import fields

    assert all(f.metadata.get("help") for f in fields(TrainConfig))


def test_pairs_become_conversational_examples(pairs_file):
    pairs, _ = load_pairs([str(pairs_file)])
    example = _to_dataset(pairs)[1]
    assert example["prompt"] == PAIRS[1]["prompt"]
    assert example["chosen"] == [{"role": "assistant", "content": "Paris."}]
    assert _to_dataset(pairs)[0]["prompt"] == [{"role": "user", "content": "How do I bake bread?"}]


def test_sft_weight_adds_the_chosen_nll_to_the_dpo_loss(chat_base, pairs_file, tmp_path):
    def first_loss(name: str, sft_weight: float) -> float:
        out = train_preference(
            TrainConfig(data=[str(pairs_file)], base=str(chat_base), quantize_4bit=False, sft_weight=sft_weight, **QUICK),
            tmp_path / name,
        ).path
        assert read_json(out / "training_metadata.json")["hyperparameters"]["sft_weight"] == sft_weight
        return read_json(out / "training_log.json")[0]["loss"]

    plain, with_nll = first_loss("plain", 0.0), first_loss("nll", 1.0)
    assert plain == pytest.approx(0.6931, abs=1e-3)
    assert with_nll > plain + 1.0  # a random tiny model gives the chosen replies a large NLL


def test_checkpointing_argument_follows_the_transformers_version():
    from dataclasses import make_dataclass

    old = make_dataclass("Old", [("gradient_checkpointing", bool)])
    new = make_dataclass("New", [("gradient_checkpointing", bool), ("activation_checkpointing", bool)])
    assert _checkpointing_argument(old) == "gradient_checkpointing"
    assert _checkpointing_argument(new) == "activation_checkpointing"


def test_use_bf16(monkeypatch):
    import lora_arith._internal.devices as devices

    assert use_bf16(False, "cpu") is False
    assert use_bf16(True, "cpu") is True
    for fast in (True, False):  # the default on a CPU follows its bf16 instructions
        monkeypatch.setattr(devices, "_cpu_has_fast_bf16", lambda fast=fast: fast)
        assert use_bf16(None, "cpu") is fast
    for supported in (True, False):  # and on CUDA, the device's bf16 support
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda supported=supported: supported)
        assert use_bf16(None, "cuda") is supported
    with pytest.raises(LoraArithError, match="does not support it"):
        use_bf16(True, "cuda:1")


def test_fast_bf16_cpus_are_read_from_cpuinfo(tmp_path):
    from lora_arith._internal.devices import _cpu_has_fast_bf16

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu sse avx512f avx512_bf16 amx_tile\n")
    assert _cpu_has_fast_bf16(cpuinfo) is True
    cpuinfo.write_text("flags\t\t: fpu sse avx512f avx512_bf16x amx_tile\n")
    assert _cpu_has_fast_bf16(cpuinfo) is False
    assert _cpu_has_fast_bf16(tmp_path / "missing") is False


# ---- base model ------------------------------------------------------------------------------


def test_load_tiny_base_in_4bit(chat_base):
    model, tokenizer = load_base(str(chat_base), quantize_4bit=True, device="cpu")
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert model.name_or_path == chat_base.name
    assert tokenizer.pad_token is not None
    assert chat_prompt(tokenizer, "Hi") == "<|user|>Hi<|end|><|assistant|>"


def test_chat_prompt_rejects_a_prompt_ending_with_the_assistant(chat_base):
    _, tokenizer = load_base(str(chat_base), quantize_4bit=False, device="cpu")
    with pytest.raises(LoraArithError, match="user turn"):
        chat_prompt(tokenizer, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])


def test_missing_pad_token_falls_back_to_eos(chat_base, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_base)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(chat_base.parent / "no-pad")
    for name in ("config.json", "model.safetensors"):
        (chat_base.parent / "no-pad" / name).write_bytes((chat_base / name).read_bytes())
    _, loaded = load_base(str(chat_base.parent / "no-pad"), quantize_4bit=False, device="cpu")
    assert loaded.pad_token == loaded.eos_token == "<|end|>"


def test_bad_base_paths_are_user_errors(tmp_path):
    with pytest.raises(LoraArithError, match="does not exist"):
        resolve_base(str(tmp_path / "missing" / "deeper" / "model"))
    with pytest.raises(LoraArithError, match="has no config.json"):
        resolve_base(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(LoraArithError, match="is a file"):
        resolve_base(str(tmp_path / "weights.bin"))


def test_base_ids():
    assert base_model_id(None) == DEFAULT_BASE_ID
    assert base_model_id(DEFAULT_BASE_ID) == DEFAULT_BASE_ID
    assert base_model_id("someone/model") == "someone/model"
    assert resolve_base("someone/model") == "someone/model"


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_ARITH_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
    monkeypatch.delenv("LORA_ARITH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "lora-arith"


def test_prompts_longer_than_max_length_are_a_user_error(chat_base, tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"prompt": "word " * 200, "chosen": "a", "rejected": "b"}) + "\n")
    config = TrainConfig(data=[str(path)], base=str(chat_base), max_length=16, quantize_4bit=False)
    with pytest.raises(LoraArithError, match="fills max_length 16"):
        train_preference(config, tmp_path / "x")


@pytest.mark.base
def test_default_base_loads_with_its_upstream_id():
    model, tokenizer = load_base(None, quantize_4bit=False, device="cpu")
    assert model.name_or_path == DEFAULT_BASE_ID
    assert model.config.num_hidden_layers == 30
    assert chat_prompt(tokenizer, "Hi").endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_adapter_on_the_default_base_records_the_upstream_id(pairs_file, tmp_path):
    out = train_preference(TrainConfig(data=[str(pairs_file)], **QUICK), tmp_path / "run").path
    assert read_json(out / "adapter_config.json")["base_model_name_or_path"] == DEFAULT_BASE_ID
    assert read_json(out / "training_metadata.json")["base_model"] == DEFAULT_BASE_ID


def test_vector_end_to_end_then_extract_combine_and_load_into_peft(chat_base, pairs_file, tmp_path):
    from peft import PeftModel

    from lora_arith.lora.adapter_io import open_adapter
    from lora_arith.lora.factors import to_dense

    vector = tmp_path / "phi.safetensors"
    args = ["vector", "--data", str(pairs_file), "-o", str(vector), "--base", str(chat_base), "--keep-runs"]
    args += [str(tmp_path / "runs"), "--max-steps", "2", "--batch-size", "2", "--max-length", "64", "--rank", "2"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    positive, negative = tmp_path / "runs" / "positive", tmp_path / "runs" / "negative"
    assert read_json(negative / "training_metadata.json")["swap"] is True
    phi, pos, neg = (open_adapter(p) for p in (vector, positive, negative))
    assert set(phi.training) == {"positive", "negative"}
    for name in phi.modules:
        expected = to_dense(pos.delta(name)) - to_dense(neg.delta(name))
        torch.testing.assert_close(to_dense(phi.delta(name)), expected, rtol=1e-5, atol=1e-7)

    extracted = tmp_path / "extracted"
    assert CliRunner().invoke(main, ["extract", str(positive), str(negative), "-o", str(extracted)]).exit_code == 0
    mix = tmp_path / "mix"
    result = CliRunner().invoke(main, ["combine", f"{vector}:0.5", f"{extracted}:0.5", "-o", str(mix)])
    assert result.exit_code == 0, result.output
    model = PeftModel.from_pretrained(load_base(str(chat_base), quantize_4bit=False, device="cpu")[0], str(mix))
    # 0.5 φ + 0.5 φ (the same vector, extracted exactly) is θ+ − θ−, patched densely from PEFT's own deltas
    expected = logits(dense_patched_model(chat_base, [(positive, 1.0), (negative, -1.0)]))
    mixed, base = logits(model), logits(load_tiny(chat_base))
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-6)
    assert (mixed - base).abs().max() > 1e3 * (mixed - expected).abs().max()  # the vector really moves the logits


def test_a_run_that_leaves_the_adapter_at_zero_is_refused(chat_base, pairs_file, tmp_path):
    """--max-steps 1 at the default warm-up ratio trains at learning rate 0 (a linear warm-up
    starts at 0), so B stays at PEFT's zero start: the run wrote an all-zero adapter, exit 0.
    Now it is a one-line error naming the two flags, and nothing is written."""
    out = tmp_path / "run"
    args = ["train", "--data", str(pairs_file), "-o", str(out), "--base", str(chat_base), "--no-4bit"]
    result = CliRunner().invoke(main, args + ["--max-steps", "1", "--batch-size", "2", "--max-length", "48"])
    assert result.exit_code == 1, result.output
    assert "Error: the learning rate was 0 at every step of the run (1 step" in result.output
    assert "raise --max-steps or lower --warmup-ratio" in result.output and not out.exists()
    # with --save-steps it leaves no checkpoints behind that would refuse the next run without --resume
    result = CliRunner().invoke(main, args + ["--max-steps", "1", "--batch-size", "2", "--max-length", "48", "--save-steps", "1"])
    assert result.exit_code == 1 and not (tmp_path / "run.checkpoints").exists(), result.output
    result = CliRunner().invoke(main, args + ["--max-steps", "1", "--batch-size", "2", "--max-length", "48", "--warmup-ratio", "0"])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "1 step," in result.output


def test_checkpoints_ask_the_hub_nothing(chat_base, pairs_file, tmp_path):
    """The trainer's checkpoints (--save-steps) were saved with PEFT's save_embedding_layers="auto",
    which looks the base's config.json up on the Hub at every checkpoint: a network request, and
    offline (as here) two warnings each time. The adapter never targets the embeddings."""
    import warnings

    out = tmp_path / "run"
    args = ["train", "--data", str(pairs_file), "-o", str(out), "--base", str(chat_base), "--no-4bit"]
    args += ["--max-steps", "2", "--save-steps", "1", "--batch-size", "2", "--max-length", "48"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    hub = [str(w.message) for w in caught if "config file" in str(w.message) or "remote file" in str(w.message)]
    assert not hub, hub


def test_train_off_a_terminal_prints_no_progress_bar(chat_base, pairs_file, tmp_path):
    """`lora-arith train --precompute-ref` with stderr in a pipe: TRL's "Computing reference log
    probs" bar (its own tqdm, outside the trainer's disable_tqdm) wrote carriage returns into the
    log; the script's process now disables every tqdm bar off a terminal, as lora-arith's own."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS")}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "lora_arith", "train", "--data", str(pairs_file), "-o", str(tmp_path / "run"),
               "--base", str(chat_base), "--no-4bit", "--max-steps", "2", "--batch-size", "2", "--max-length", "48",
               "--precompute-ref"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr and "log probs" not in done.stderr, done.stderr
    assert "wrote" in done.stdout


def test_a_4bit_base_stays_differentiable_after_an_evaluation_pass(chat_base, pairs_file, tmp_path):
    """On a CPU with AVX-512 BF16 (this project's machines), bitsandbytes repacks a 4-bit layer for
    a faster kernel the first time it runs in eval mode without gradients (--precompute-ref's
    reference pass, each --eval-data evaluation), and that kernel has no backward: for the rest of
    the run no gradient passed through the base's layers (only through the LoRA branches). The
    reference log-probs are the same computed first or on the fly, so a run with --precompute-ref
    must train the same adapter as one without (it differed by up to twice the factors' size)."""
    import warnings

    import bitsandbytes.functional

    from lora_arith.lora.adapter_io import open_adapter

    if not bitsandbytes.functional.has_avx512bf16():
        pytest.skip("bitsandbytes repacks 4-bit layers only on a CPU with AVX-512 BF16")
    args = ["train", "--data", str(pairs_file), "--base", str(chat_base), "--4bit", "--max-steps", "2",
            "--warmup-ratio", "0", "--batch-size", "2", "--max-length", "48", "--no-bf16"]  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name, extra in (("plain", []), ("precomputed", ["--precompute-ref"])):
            result = CliRunner().invoke(main, [*args, *extra, "-o", str(tmp_path / name)])
            assert result.exit_code == 0, result.output
    assert not [w for w in caught if "autograd kernel was not registered" in str(w.message)]
    plain, precomputed = open_adapter(tmp_path / "plain"), open_adapter(tmp_path / "precomputed")
    for module in plain.modules:
        torch.testing.assert_close(precomputed.delta(module).B, plain.delta(module).B, rtol=1e-4, atol=1e-6)
