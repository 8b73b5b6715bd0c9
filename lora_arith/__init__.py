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
    "VectorResult": ("training.vector", "VectorResult"),
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
    "RowRequest": ("serving.protocol", "RowRequest"),
    "RowResult": ("serving.protocol", "RowResult"),
    # sharing/
    "Export": ("sharing.export", "Export"),
    "export": ("sharing.export", "export_adapters"),
    "GgufExport": ("sharing.gguf", "GgufExport"),
    "export_gguf": ("sharing.gguf", "export_gguf"),
    "export_gguf_adapters": ("sharing.gguf", "export_gguf_adapters"),
    "push": ("sharing.push", "push"),
    "plan_upload": ("sharing.push", "plan_upload"),
    "UploadPlan": ("sharing.push", "UploadPlan"),
    # errors
    "LoraArithError": ("_internal.errors", "LoraArithError"),
    "OptionError": ("_internal.errors", "OptionError"),
}
"""Each public name → (its module under ``lora_arith``, its name there)."""

__all__ = [
    "__version__", "AdapterFile", "open_adapter", "load_adapter", "save_adapter", "convert_adapter",
    "AdapterSpec", "parse_spec", "parse_specs", "Combination", "combine", "extract", "LowRankDelta",
    "Similarity", "similarity", "PairInterference", "interference", "load_base", "PreferenceMixer", "merge",
    "merge_adapters", "PreferencePair", "load_pairs", "TrainConfig", "TrainResult", "train_preference",
    "train_vector", "VectorResult", "EvalConfig", "EvalPrompt", "EvalResult", "evaluate", "load_eval_prompts",
    "SweepResult", "sweep", "TuneResult", "tune", "Engine", "RowRequest", "RowResult", "Export", "export", "GgufExport",
    "export_gguf", "export_gguf_adapters", "push", "plan_upload", "UploadPlan", "LoraArithError",
    "OptionError",
]
"""Written out for type checkers (``mypy --strict`` reads only a literal ``__all__``); the same
names as ``_LAZY``, in its order (``tests/test_public_api.py``)."""


def __getattr__(name: str) -> Any:
    try:
        module, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'lora_arith' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"{__name__}.{module}"), attribute)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    """The public names and the subpackages imported so far (not this module's own imports)."""
    loaded = {name for name, value in globals().items() if getattr(value, "__name__", "").startswith(f"{__name__}.")}
    return sorted(set(__all__) | {name for name in loaded if not name.startswith("_") and name not in _LAZY})


if TYPE_CHECKING:  # what type checkers and IDEs see (each `X as X`: an explicit re-export, for mypy --strict);
    # tests/test_public_api.py checks it matches _LAZY
    from lora_arith._internal.errors import LoraArithError as LoraArithError
    from lora_arith._internal.errors import OptionError as OptionError
    from lora_arith.evaluation.config import EvalConfig as EvalConfig
    from lora_arith.evaluation.evaluate import EvalPrompt as EvalPrompt
    from lora_arith.evaluation.evaluate import EvalResult as EvalResult
    from lora_arith.evaluation.evaluate import evaluate as evaluate
    from lora_arith.evaluation.evaluate import load_eval_prompts as load_eval_prompts
    from lora_arith.evaluation.sweep import SweepResult as SweepResult
    from lora_arith.evaluation.sweep import sweep as sweep
    from lora_arith.evaluation.tune import TuneResult as TuneResult
    from lora_arith.evaluation.tune import tune as tune
    from lora_arith.lora.adapter_io import AdapterFile as AdapterFile
    from lora_arith.lora.adapter_io import convert_adapter as convert_adapter
    from lora_arith.lora.adapter_io import open_adapter as open_adapter
    from lora_arith.lora.adapter_io import save_adapter as save_adapter
    from lora_arith.lora.adapter_io import open_adapter as load_adapter
    from lora_arith.lora.analysis import PairInterference as PairInterference
    from lora_arith.lora.analysis import Similarity as Similarity
    from lora_arith.lora.analysis import interference as interference
    from lora_arith.lora.analysis import similarity as similarity
    from lora_arith.lora.combine import Combination as Combination
    from lora_arith.lora.combine import combine as combine
    from lora_arith.lora.combine import extract as extract
    from lora_arith.lora.factors import LowRankDelta as LowRankDelta
    from lora_arith.lora.specs import AdapterSpec as AdapterSpec
    from lora_arith.lora.specs import parse_spec as parse_spec
    from lora_arith.lora.specs import parse_specs as parse_specs
    from lora_arith.model.base import load_base as load_base
    from lora_arith.model.merge import merge_adapters as merge_adapters
    from lora_arith.model.merge import merge_adapters as merge
    from lora_arith.model.mixing import PreferenceMixer as PreferenceMixer
    from lora_arith.serving.engine import Engine as Engine
    from lora_arith.serving.protocol import RowRequest as RowRequest
    from lora_arith.serving.protocol import RowResult as RowResult
    from lora_arith.sharing.export import Export as Export
    from lora_arith.sharing.export import export_adapters as export
    from lora_arith.sharing.gguf import GgufExport as GgufExport
    from lora_arith.sharing.gguf import export_gguf as export_gguf
    from lora_arith.sharing.gguf import export_gguf_adapters as export_gguf_adapters
    from lora_arith.sharing.push import push as push
    from lora_arith.sharing.push import plan_upload as plan_upload
    from lora_arith.sharing.push import UploadPlan as UploadPlan
    from lora_arith.training.data import PreferencePair as PreferencePair
    from lora_arith.training.data import load_pairs as load_pairs
    from lora_arith.training.train import TrainConfig as TrainConfig
    from lora_arith.training.train import TrainResult as TrainResult
    from lora_arith.training.train import train_preference as train_preference
    from lora_arith.training.vector import train_vector as train_vector
    from lora_arith.training.vector import VectorResult as VectorResult
