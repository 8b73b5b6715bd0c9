"""Shared fixtures: tiny random Llama/GPT-2 bases and random PEFT adapters built in-process."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import PAIRS, TINY_LLAMA, make_adapter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def openai():
    """The ``openai`` package: a test that takes it is skipped where it is not installed."""
    return pytest.importorskip("openai")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread (use with ``pytestmark = pytest.mark.usefixtures("one_thread")``): on a busy
    2-core machine OpenMP's spinning threads make tiny models ~100× slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A saved tiny random LlamaForCausalLM (no tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A saved tiny random GPT-2 (its Conv1D layers need ``fan_in_fan_out=True``)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)).save_pretrained(path)
    return path


@pytest.fixture
def adapter_factory(tiny_llama, tmp_path):
    """``factory(name, **lora_kwargs)`` → a random adapter directory for the tiny Llama."""
    counter = itertools.count()

    def factory(name: str | None = None, base: Path | None = None, **kwargs: Any) -> Path:
        return make_adapter(base or tiny_llama, tmp_path / (name or f"adapter{next(counter)}"), **kwargs)

    return factory


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    """:data:`PAIRS` as a JSONL file."""
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in PAIRS), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory) -> Path:
    """A saved tiny random chat model with its tokenizer (see ``tiny_models``)."""
    from tiny_models import make_tiny_chat_model

    return make_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))


@pytest.fixture(scope="module")
def two_adapters(chat_base, tmp_path_factory) -> tuple[Path, Path]:
    """Two random adapters for ``chat_base`` with different ranks, scalings and target modules."""
    folder = tmp_path_factory.mktemp("chat-adapters")
    # fixed seeds: the same two adapters in every module, whatever ran before (texts compared
    # across tests and runs stay comparable, and no run meets a pair that overflows the tiny model)
    helpful = make_adapter(chat_base, folder / "helpful", seed=101, r=4, lora_alpha=8)
    harmless = make_adapter(
        chat_base,
        folder / "harmless",
        seed=102,
        r=2,
        lora_alpha=3,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "up_proj"],
    )
    return helpful, harmless
