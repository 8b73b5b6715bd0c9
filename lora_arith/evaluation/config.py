"""What :func:`~lora_arith.evaluation.evaluate.evaluate`, :func:`~lora_arith.evaluation.sweep.sweep`
and :func:`~lora_arith.evaluation.tune.tune` share: how a mix is evaluated (:class:`EvalConfig`) and
what it is evaluated on (:class:`EvalInputs`), with the hash that lets a sweep resume."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence, Union

from lora_arith._internal.errors import OptionError
from lora_arith._internal.privacy import public_name
from lora_arith.evaluation.metrics import KINDS
from lora_arith.lora.numerics import require_count, require_positive

if TYPE_CHECKING:
    from lora_arith.evaluation.evaluate import EvalPrompt
    from lora_arith.evaluation.judge import Judge
    from lora_arith.lora.specs import AdapterSpec
    from lora_arith.model.mixing import PreferenceMixer
    from lora_arith.training.data import PreferencePair

__all__ = ["EvalConfig", "EvalInputs", "load_inputs", "Adapters", "adapter_specs", "require_mapping", "VECTORS_EXAMPLE"]

PathLike = Union[str, "os.PathLike[str]"]
Adapters = Mapping[str, Union[PathLike, "AdapterSpec"]]
"""Adapters by name: a path (weight 1) or an :class:`~lora_arith.lora.specs.AdapterSpec` (a path and a weight)."""


@dataclass(frozen=True)
class EvalConfig:
    """How a mix is evaluated: the base model, generation and the refusal judge.

    The library functions take these fields as keywords (``evaluate(..., base=..., max_new_tokens=64)``)
    or a whole config (``config=EvalConfig(...)``)."""

    base: str | None = None
    """A local folder or Hub id; None: the embedded SmolLM2-135M-Instruct."""
    quantize_4bit: bool = False
    device: str | None = None
    batch_size: int = 16
    max_new_tokens: int = 128
    beta: float = 0.1
    """DPO β of the implicit reward (pair metrics)."""
    judge: str = "strmatch"
    """``strmatch``, ``MODULE:CALLABLE`` or the URL of an OpenAI-compatible endpoint (see :mod:`lora_arith.evaluation.judge`)."""
    judge_model: str = "judge"

    def __post_init__(self) -> None:
        """Refuse settings that cannot work before anything loads: counts that are not whole
        numbers of at least 1, a β that is not a positive finite number."""
        require_count(self.batch_size, "batch_size")
        require_count(self.max_new_tokens, "max_new_tokens")
        require_positive(self.beta, "beta")

    @classmethod
    def build(cls, config: EvalConfig | None, settings: Mapping[str, Any], caller: str) -> EvalConfig:
        """``config`` (default: the defaults) with ``settings`` replacing fields; an unknown name is a
        TypeError, as for any unexpected keyword argument of ``caller``."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise TypeError(f"{caller}() got an unexpected keyword argument {unknown[0]!r}")
        return replace(config or cls(), **settings)

    def make_judge(self) -> Judge:
        from lora_arith.evaluation.judge import make_judge

        return make_judge(self.judge, self.judge_model)

    def mixer(self, adapters: Adapters) -> PreferenceMixer:
        """The base with every adapter attached under its name, at its weight."""
        from lora_arith.model.mixing import PreferenceMixer

        return PreferenceMixer.from_specs(
            self.base, adapter_specs(adapters), quantize_4bit=self.quantize_4bit, device=self.device
        )

    def on_mixer(self, mixer: PreferenceMixer | None, names: Iterable[str] = ()) -> EvalConfig:
        """This config for a run on ``mixer`` (``None``: unchanged), with the base the mixer holds,
        which is what a report records and what a sweep resumes by. The base, 4-bit and device
        settings are the mixer's, so giving them too is an error, as is a name of ``names`` (the
        run's adapters) that the mixer lacks: both are checked before anything is written."""
        from lora_arith.model.base import is_default_base

        if mixer is None:
            return self
        for name in ("base", "quantize_4bit", "device"):
            if getattr(self, name) != getattr(EvalConfig, name):
                raise OptionError(("mixer", name), "the {} holds its base already: leave out {}")
        missing = [name for name in names if name not in mixer.names]
        if missing:
            raise OptionError("mixer", "the {} has no adapter named {name!r}", name=missing[0])
        inner = mixer.model.get_base_model() if hasattr(mixer.model, "get_base_model") else mixer.model
        return replace(
            self,
            base=None if is_default_base(mixer.base) else mixer.base,  # as the mixer was given it, as a config holds it
            quantize_4bit=getattr(inner, "hf_quantizer", None) is not None,  # 4-bit, not int8 (not a config setting)
        )

    def generation(self) -> dict[str, Any]:
        """The keywords of the evaluation calls: max_new_tokens, batch_size and beta."""
        return dict(max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, beta=self.beta)

    def public_base(self) -> str:
        """The base's name without local folders (for shareable reports)."""
        if self.base is None:
            return "default (SmolLM2-135M-Instruct)"
        return public_name(self.base)

    def sources(self, adapter_paths: Iterable[PathLike], files: Iterable[PathLike] = ()) -> list[Path]:
        """The local inputs of a run: the base's files, the adapters' files and ``files``; an
        output is checked against them so that it never replaces one."""
        from lora_arith.model.base import model_inputs

        return model_inputs(self.base, [os.fspath(path) for path in adapter_paths], *files)


VECTORS_EXAMPLE = "{'helpful': 'adapters/helpful', 'harmless': 'adapters/harmless'}"
"""How to give the vectors of ``sweep`` and ``tune``, for their errors."""


def require_mapping(value: Any, option: str, example: str) -> Mapping[str, Any]:
    """``value`` if it is a mapping (name → ...), else an :class:`OptionError` naming ``option``
    with an ``example`` of one (a list of paths or ``NAME=WEIGHT`` texts is a common slip)."""
    if not isinstance(value, Mapping):
        raise OptionError(option, "{} must be a mapping such as {example}, not {value!r}", example=example, value=value)
    return value


def adapter_specs(adapters: Adapters, option: str = "adapters") -> dict[str, AdapterSpec]:
    """``adapters`` with every path made an :class:`~lora_arith.lora.specs.AdapterSpec` of weight 1."""
    from lora_arith.lora.specs import AdapterSpec

    require_mapping(adapters, option, "{'helpful': 'adapters/helpful'}")
    return {
        name: value if isinstance(value, AdapterSpec) else AdapterSpec(os.fspath(value), 1.0)
        for name, value in adapters.items()
    }


@dataclass(frozen=True)
class EvalInputs:
    """The prompts and pairs a run evaluates, and the files they came from."""

    prompts: list[EvalPrompt]
    pairs: list[PreferencePair]
    files: tuple[Path, ...] = field(default=())

    def count(self, kind: str) -> int:
        return sum(p.kind == kind for p in self.prompts)

    def sha256(self) -> str:
        """A hash of every prompt and pair by content (not by file name)."""
        content = json.dumps(
            [[p.prompt, p.kind, p.type] for p in self.prompts] + [[q.prompt, q.chosen, q.rejected] for q in self.pairs],
            sort_keys=True,
            ensure_ascii=False,
        )
        return hashlib.sha256(content.encode()).hexdigest()

    def settings(self, config: EvalConfig, adapters: Adapters, judge: Judge) -> dict[str, Any]:
        """Everything that decides a run's results (inputs and adapters by content, ``judge`` by
        name), for resuming."""
        from lora_arith.lora.adapter_io import open_adapter

        return {
            "inputs_sha256": self.sha256(),
            "adapters": {name: open_adapter(spec.path).sha256 for name, spec in adapter_specs(adapters).items()},
            "base": config.base,
            "quantize_4bit": config.quantize_4bit,
            "max_new_tokens": config.max_new_tokens,
            "batch_size": config.batch_size,
            "beta": config.beta,
            "judge": judge.name,
        }


def _split(items: Sequence[Any] | PathLike | None, kind: type, option: str) -> tuple[list[Any], list[Path]]:
    """(objects of ``kind``, paths) from a path or a sequence mixing paths and objects (``None``: none)."""
    if items is None:
        return [], []
    if isinstance(items, (str, os.PathLike)):
        items = [items]
    if not isinstance(items, Iterable):
        raise TypeError(f"{option}: expected JSONL paths or {kind.__name__} objects, not {items!r}")
    items = list(items)
    for item in items:
        if not isinstance(item, (kind, str, os.PathLike)):
            raise TypeError(f"{option}: expected JSONL paths or {kind.__name__} objects, not {item!r}")
    objects = [item for item in items if isinstance(item, kind)]
    paths = [Path(item) for item in items if not isinstance(item, kind)]
    return objects, paths


def load_inputs(
    prompts: Sequence[EvalPrompt | PathLike] | PathLike = (),
    pairs: Sequence[PreferencePair | PathLike] | PathLike = (),
    *,
    limit: int | None = None,
    max_pairs: int | None = None,
    label: str | None = None,
) -> EvalInputs:
    """Read the evaluation inputs: ``prompts`` are JSONL files (XSTest style, see
    :func:`~lora_arith.evaluation.evaluate.load_eval_prompts`) or :class:`EvalPrompt` objects,
    ``pairs`` preference-pair JSONL files or :class:`PreferencePair` objects. ``limit`` keeps the
    first N prompts of each kind, ``max_pairs`` the first N pairs of each file; ``label`` (helpful
    or harmless) reads PKU-SafeRLHF pair files (see :func:`~lora_arith.training.data.load_pairs`)."""
    from lora_arith.evaluation.evaluate import EvalPrompt, load_eval_prompts
    from lora_arith.training.data import PreferencePair, load_pairs

    for option, count in (("limit", limit), ("max_pairs", max_pairs)):
        if count is not None:
            require_count(count, option)
    prompt_items, prompt_files = _split(prompts, EvalPrompt, "prompts")
    pair_items, pair_files = _split(pairs, PreferencePair, "pairs")
    if not prompt_items and not prompt_files and not pair_items and not pair_files:
        raise OptionError(("prompts", "pairs"), "give {} and/or {}")
    items = prompt_items + (load_eval_prompts(prompt_files) if prompt_files else [])
    if limit is not None:
        items = [p for kind in KINDS for p in [q for q in items if q.kind == kind][:limit]]
    loaded = [pair for path in pair_files for pair in load_pairs([str(path)], label=label)[0][:max_pairs]]
    return EvalInputs(items, pair_items[:max_pairs] + loaded, tuple(prompt_files + pair_files))
