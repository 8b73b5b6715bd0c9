"""lora-arith: preference vectors as LoRA adapters, combined exactly on their low-rank factors.

The public API, loaded lazily (PEP 562): ``import lora_arith`` imports no torch; each name
imports its module the first time it is used::

    import lora_arith as la

    phi = la.extract("runs/helpful_pos", "runs/helpful_neg")          # φ = θ+ − θ−
    phi.save("helpful")
    mix = la.combine([la.AdapterSpec("helpful", 1.0), la.AdapterSpec("harmless", 0.5)])
    found = la.tune({"helpful": "helpful", "harmless": "harmless"}, prompts="xstest.jsonl",
                    maximize="refusal_rate", subject_to="compliance_rate>=0.9")
    found.eta, found.save("tuned")

The layers, one subpackage each: :mod:`lora_arith.lora` (factor math and adapter files, no model),
:mod:`lora_arith.model` (the base model, generation, run-time mixing, merging),
:mod:`lora_arith.training`, :mod:`lora_arith.evaluation`, :mod:`lora_arith.serving`,
:mod:`lora_arith.sharing` (Hub, export), and the command line in :mod:`lora_arith.cli`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY: dict[str, tuple[str, str]] = {
    # lora/: adapters and their arithmetic, no model loaded
    "AdapterFile": ("lora.adapter_io", "AdapterFile"),
    "open_adapter": ("lora.adapter_io", "open_adapter"),
    "load_adapter": ("lora.adapter_io", "open_adapter"),
    "save_adapter": ("lora.adapter_io", "save_adapter"),
    "convert_adapter": ("lora.adapter_io", "convert_adapter"),
    "AdapterSpec": ("lora.specs", "AdapterSpec"),
    "parse_spec": ("lora.specs", "parse_spec"),
    "parse_specs": ("lora.specs", "parse_specs"),
    "Combination": ("lora.combine", "Combination"),
    "combine": ("lora.combine", "combine"),
    "extract": ("lora.combine", "extract"),
    "LowRankDelta": ("lora.factors", "LowRankDelta"),
    "Similarity": ("lora.analysis", "Similarity"),
    "similarity": ("lora.analysis", "similarity"),
    "PairInterference": ("lora.analysis", "PairInterference"),
    "interference": ("lora.analysis", "interference"),
    # model/: the base model
    "load_base": ("model.base", "load_base"),
    "PreferenceMixer": ("model.mixing", "PreferenceMixer"),
    "merge": ("model.merge", "merge_adapters"),
    "merge_adapters": ("model.merge", "merge_adapters"),
    # training/
    "PreferencePair": ("training.data", "PreferencePair"),
    "load_pairs": ("training.data", "load_pairs"),
    "TrainConfig": ("training.train", "TrainConfig"),
    "TrainResult": ("training.train", "TrainResult"),
    "train_preference": ("training.train", "train_preference"),
    "train_vector": ("training.vector", "train_vector"),
    # evaluation/
    "EvalConfig": ("evaluation.config", "EvalConfig"),
    "EvalPrompt": ("evaluation.evaluate", "EvalPrompt"),
    "EvalResult": ("evaluation.evaluate", "EvalResult"),
    "evaluate": ("evaluation.evaluate", "evaluate"),
    "load_eval_prompts": ("evaluation.evaluate", "load_eval_prompts"),
    "SweepResult": ("evaluation.sweep", "SweepResult"),
    "sweep": ("evaluation.sweep", "sweep"),
    "TuneResult": ("evaluation.tune", "TuneResult"),
    "tune": ("evaluation.tune", "tune"),
    # serving/
    "Engine": ("serving.engine", "Engine"),
    # sharing/
    "Export": ("sharing.export", "Export"),
    "export": ("sharing.export", "export_adapters"),
    "GgufExport": ("sharing.gguf", "GgufExport"),
    "export_gguf": ("sharing.gguf", "export_gguf"),
    "export_gguf_adapters": ("sharing.gguf", "export_gguf_adapters"),
    "push": ("sharing.push", "push"),
    # errors
    "LoraArithError": ("_internal.errors", "LoraArithError"),
}
"""Each public name → (its module under ``lora_arith``, its name there)."""

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    try:
        module, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'lora_arith' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"{__name__}.{module}"), attribute)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # what type checkers and IDEs see; tests/test_public_api.py checks it matches _LAZY
    from lora_arith._internal.errors import LoraArithError
    from lora_arith.evaluation.config import EvalConfig
    from lora_arith.evaluation.evaluate import EvalPrompt, EvalResult, evaluate, load_eval_prompts
    from lora_arith.evaluation.sweep import SweepResult, sweep
    from lora_arith.evaluation.tune import TuneResult, tune
    from lora_arith.lora.adapter_io import AdapterFile, convert_adapter, open_adapter, save_adapter
    from lora_arith.lora.adapter_io import open_adapter as load_adapter
    from lora_arith.lora.analysis import PairInterference, Similarity, interference, similarity
    from lora_arith.lora.combine import Combination, combine, extract
    from lora_arith.lora.factors import LowRankDelta
    from lora_arith.lora.specs import AdapterSpec, parse_spec, parse_specs
    from lora_arith.model.base import load_base
    from lora_arith.model.merge import merge_adapters
    from lora_arith.model.merge import merge_adapters as merge
    from lora_arith.model.mixing import PreferenceMixer
    from lora_arith.serving.engine import Engine
    from lora_arith.sharing.export import Export
    from lora_arith.sharing.export import export_adapters as export
    from lora_arith.sharing.gguf import GgufExport, export_gguf, export_gguf_adapters
    from lora_arith.sharing.push import push
    from lora_arith.training.data import PreferencePair, load_pairs
    from lora_arith.training.train import TrainConfig, TrainResult, train_preference
    from lora_arith.training.vector import train_vector
