"""Train one preference as a LoRA adapter with DPO (TRL's ``DPOTrainer``) on a frozen, by default 4-bit, base.

The reference model is the base itself: TRL disables the adapter to compute the reference
log-probabilities, so no second model is loaded. Pairs are given to TRL in conversational
form, so they are tokenised with the base's own chat template.

:func:`train_preference` returns a :class:`TrainResult` (the folder, the metadata, the per-step
log) and writes, into its output folder, each file once from memory:

* the PEFT adapter (``adapter_config.json``, ``adapter_model.safetensors``) and its single-file
  form ``NAME.safetensors`` with the training summary embedded;
* ``training_log.json``: one entry per logging step with ``loss``, ``rewards/accuracies``,
  ``rewards/margins`` and TRL's other metrics;
* ``training_metadata.json``: data files with their sha256, swap flag, label, hyperparameters,
  package versions and wall time.

The output is checked before training starts and written into a temporary sibling that is
renamed into place at the end, so a failed run leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import tempfile
import time
import types
import typing
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_arith._internal.atomic import Output, atomic_output, check_output, removed_on_signal
from lora_arith.training.data import (
    LABELS,
    LoadReport,
    PreferencePair,
    load_pairs,
    spec_file,
    to_messages,
)
from lora_arith._internal.devices import resolve_device, use_bf16
from lora_arith.lora.numerics import finite_number, require_count, require_positive
from lora_arith.lora.specs import path_list
from lora_arith._internal.errors import LoraArithError, OptionError, first_line
from lora_arith._internal.privacy import public_name, scrub
from lora_arith._internal.quiet import peft_warnings_hidden
from lora_arith._internal.wording import plural
from lora_arith._internal.provenance import sha256_of, versions

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
    from trl import DPOTrainer

__all__ = [
    "TrainConfig",
    "TrainResult",
    "train_preference",
    "checkpoint_folder",
    "has_checkpoint",
    "TRAINING_LOG",
    "TRAINING_METADATA",
    # the checkpoint and resume machinery train_vector shares
    "RUN_SETTINGS",
    "last_checkpoint",
    "run_settings",
    "check_same_settings",
    "discard_leftovers",
    "is_main_process",
    "single_file_name",
    "training_inputs",
]

TRAINING_LOG = "training_log.json"
"""Per-step metrics written next to the adapter."""

TRAINING_METADATA = "training_metadata.json"
"""Provenance written next to the adapter: data hashes, settings, versions, wall time."""


@dataclass
class TrainConfig:
    """What one DPO run trains (data, base, LoRA and DPO hyper-parameters), checked when built.

    Where the run is written, whether it is replaced and whether chosen and rejected are swapped
    are arguments of :func:`train_preference`, not settings of the training.

    The defaults follow the paper's DPO settings (β 0.1, 2 epochs, cosine schedule, warm-up 0.03,
    weight decay 0.05, effective batch 16, max length 512) with a learning rate suited to LoRA
    on a small model instead of the paper's full fine-tuning rate of 1e-6.
    """

    data: Sequence[str | os.PathLike[str]] = field(  # one spec, or paths, are taken too: kept as a list of texts
        metadata={"help": "Data specs: JSONL files, refusal:PATH / answer:PATH templated files, or Hub dataset ids."}
    )
    base: str | None = field(
        default=None,
        metadata={"help": "Base model: a local directory or Hub id. Default: the embedded SmolLM2-135M-Instruct."},
    )
    label: str | None = field(
        default=None,
        metadata={"help": "PKU-SafeRLHF label to train on: 'helpful' or 'harmless' (needed for such records)."},
    )
    skip_invalid: bool = field(default=False, metadata={"help": "Skip and count bad rows instead of stopping."})
    rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; the update is scaled by alpha / rank."})
    targets: str = field(
        default="all-linear",
        metadata={"help": "Modules to adapt: 'all-linear' or comma-separated module names (e.g. q_proj,v_proj)."},
    )
    dropout: float = field(
        default=0.0, metadata={"help": "LoRA dropout; 0 keeps all dropout off, as DPO usually does."}
    )
    beta: float = field(default=0.1, metadata={"help": "DPO beta: higher keeps the policy closer to the base."})
    sft_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of a negative log-likelihood term on the chosen replies added to the DPO loss "
            "(as in RPO). DPO alone may lower the chosen reply's likelihood along with the rejected one; "
            "this term keeps the chosen reply likely. 0 is plain DPO."
        },
    )
    lr: float = field(default=5e-4, metadata={"help": "Peak learning rate (AdamW)."})
    epochs: float = field(default=2.0, metadata={"help": "Passes over the pairs (ignored when a step limit is set)."})
    max_steps: int | None = field(
        default=None, metadata={"help": "Stop after this many optimizer steps (overrides epochs)."}
    )
    batch_size: int = field(default=4, metadata={"help": "Pairs per forward pass."})
    grad_accum: int = field(
        default=4, metadata={"help": "Forward passes per optimizer step (effective batch = batch size × this)."}
    )
    max_length: int = field(
        default=512,
        metadata={
            "help": "Token limit of prompt + reply; longer replies are cut, pairs whose prompt alone is this "
            "long are dropped. 256 is 2-4x faster on CPU."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed for adapter initialisation, shuffling and templates."})
    quantize_4bit: bool = field(default=True, metadata={"help": "Load the base in 4-bit NF4 (QLoRA)."})
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "bf16 mixed precision (autocast; the LoRA weights stay fp32). Default: on where bf16 is fast, "
            "i.e. a CUDA GPU with bf16 or a CPU with AVX512-BF16/AMX (there 1.2-1.5x faster than fp32)."
        },
    )
    double_quant: bool = field(default=False, metadata={"help": "Also quantize the 4-bit scales."})
    warmup_ratio: float = field(default=0.03, metadata={"help": "Fraction of steps for linear warm-up."})
    lr_scheduler: str = field(default="cosine", metadata={"help": "Learning-rate schedule after warm-up."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay."})
    logging_steps: int = field(default=1, metadata={"help": "Record metrics every this many optimizer steps."})
    device: str | None = field(default=None, metadata={"help": "'cpu' or 'cuda[:N]'; None picks CUDA if available."})
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Recompute activations in the backward pass to save memory. Default: on for CUDA."},
    )
    report_to: str = field(
        default="none", metadata={"help": "Where transformers reports metrics: 'none', 'tensorboard', 'wandb', ..."}
    )
    dpo_arg: list[str] = field(
        default_factory=list,
        metadata={"help": "KEY=VALUE passed to TRL's DPOConfig (VALUE read as JSON, else as text, and checked against "
            "the field's type; output_dir, push_to_hub and hub_* are lora-arith's own)."},
    )
    save_steps: int | None = field(
        default=None,
        metadata={
            "help": "Write a checkpoint (transformers' checkpoint-N: adapter, optimizer, scheduler, RNG state) "
            "every this many optimizer steps into OUTPUT.checkpoints/, next to the output; removed once the "
            "output is written. A killed run continues from the last one with --resume."
        },
    )
    eval_data: str | None = field(
        default=None,
        metadata={
            "help": "Held-out pairs (a data spec, as --data) to evaluate on every logging step: TRL's eval_loss "
            "and eval_rewards/* join the per-step log and the training metadata."
        },
    )
    precompute_ref: bool = field(
        default=False,
        metadata={
            "help": "Compute the reference log-probs of all pairs once before training (TRL's "
            "precompute_ref_log_probs), so each step skips the reference forward passes."
        },
    )

    @classmethod
    def help(cls, name: str) -> str:
        """The help text of field ``name``."""
        return next(f.metadata["help"] for f in fields(cls) if f.name == name)

    def __post_init__(self) -> None:
        """Raise :class:`LoraArithError` (an :class:`OptionError` naming the setting) for settings
        that cannot work, and a :class:`TypeError` for ``data`` that is not paths or texts."""
        self.data = path_list(self.data, "data")  # one spec is a list of one; paths become texts
        # finite numbers (an infinite lr or alpha trained an all-NaN adapter), whole ones for counts
        for name in ("rank", "batch_size", "grad_accum", "max_length", "logging_steps", "max_steps", "save_steps"):
            if getattr(self, name) is not None:
                require_count(getattr(self, name), name)
        for name in ("alpha", "beta", "lr", "epochs"):  # an infinite lr or alpha trained an all-NaN adapter
            require_positive(getattr(self, name), name)
        for name in ("sft_weight", "weight_decay"):
            require_positive(getattr(self, name), name, zero=True)
        for name in ("dropout", "warmup_ratio"):
            value = getattr(self, name)
            if finite_number(value) is None or not 0 <= value < 1:
                raise OptionError(name, "{} must be in [0, 1), got {value!r}", value=value)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise OptionError("seed", "{} must be a whole number from 0 to 2**32 - 1, got {value!r}", value=self.seed)
        if self.label is not None and self.label not in LABELS:
            raise LoraArithError(f"unknown label {self.label!r}; use one of {', '.join(LABELS)}")
        if not self.data:
            raise LoraArithError("no data files given")
        for name in ("quantize_4bit", "double_quant", "skip_invalid", "precompute_ref", "bf16", "gradient_checkpointing"):
            value = getattr(self, name)  # "no" is truthy: it turned 4-bit on
            if not isinstance(value, bool) and not (value is None and name in ("bf16", "gradient_checkpointing")):
                raise OptionError(name, "{} must be True or False, not {value!r}", value=value)
        if isinstance(self.targets, (list, tuple)) and all(isinstance(name, str) for name in self.targets):
            self.targets = ",".join(self.targets)  # as PEFT takes them: a list of module names
        if not isinstance(self.targets, str):
            raise OptionError("targets", "{} must be 'all-linear' or module names, not {value!r}", value=self.targets)
        self.dpo_arg = [self.dpo_arg] if isinstance(self.dpo_arg, str) else list(self.dpo_arg)  # one: a list of one
        self.dpo_arguments()
        if self.double_quant and not self.quantize_4bit:
            raise LoraArithError("double_quant needs the 4-bit base (quantize_4bit)")
        self.target_modules()

    def dpo_arguments(self) -> dict[str, Any]:
        """``dpo_arg`` as keyword arguments of TRL's ``DPOConfig``, each VALUE read as JSON (else as
        text) and checked against the field's type. An unknown key, a value of the wrong type, and
        the keys lora-arith sets itself (:data:`_OWN_DPO_ARGS`, ``hub_*``) are errors."""
        if not self.dpo_arg:
            return {}
        from trl import DPOConfig

        known = {item.name: item.type for item in fields(DPOConfig)}
        arguments = {}
        for item in self.dpo_arg:
            key, equals, text = item.partition("=")
            key = key.strip()
            if not equals or not key:
                raise OptionError("dpo_arg", "{} {item!r} is not KEY=VALUE", item=item)
            if key not in known:
                raise OptionError("dpo_arg", "{} {key!r} is not a DPOConfig argument", key=key)
            if key in _OWN_DPO_ARGS or key.startswith("hub_"):
                raise OptionError("dpo_arg", "{} {key!r} is set by lora-arith (the output folder, no Hub upload); drop it", key=key)
            try:
                value = json.loads(text)
            except (ValueError, RecursionError):
                value = text
            if not _fits(value, known[key]) and _fits(text, known[key]):
                value = text  # a text field given a text that reads as JSON: run_name=2024
            if not _fits(value, known[key]):
                raise OptionError(
                    "dpo_arg", "{} {key}={text} is not of DPOConfig's type for it ({kind})",
                    key=key, text=text.strip(), kind=_type_name(known[key]),
                )  # fmt: skip
            arguments[key] = value
        return arguments

    def target_modules(self) -> str | list[str]:
        """``targets`` in the form PEFT takes: ``"all-linear"`` or a list of module names."""
        if self.targets.strip() == "all-linear":
            return "all-linear"
        names = [name.strip() for name in self.targets.split(",") if name.strip()]
        if not names:
            raise LoraArithError("targets is empty; use 'all-linear' or module names")
        return names


_OWN_DPO_ARGS = ("output_dir", "push_to_hub")
"""DPOConfig arguments ``dpo_arg`` may not set (nor any ``hub_*``): where checkpoints go is
``OUTPUT.checkpoints/`` (removed once the output is written), and nothing is uploaded."""


def _fits(value: Any, annotation: Any) -> bool:
    """Whether the JSON ``value`` fits a DPOConfig field's ``annotation`` as far as its plain
    types say (a finite number for a float, a whole one for an int, a bool, a text, None); other
    types (lists, enums) are left to TRL."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    for kind in typing.get_args(annotation) if union else (annotation,):
        if kind is type(None):
            if value is None:
                return True
        elif kind is bool:
            if isinstance(value, bool):
                return True
        elif kind is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return True
        elif kind is float:
            if finite_number(value) is not None:  # an int or a float, finite (not a bool)
                return True
        elif kind is str:
            if isinstance(value, str):
                return True
        else:
            return True
    return False


def _type_name(annotation: Any) -> str:
    return annotation.__name__ if isinstance(annotation, type) else str(annotation)


FINAL_METRICS = ("loss", "rewards/accuracies", "rewards/margins")


@dataclass(frozen=True)
class TrainResult:
    """A finished run: where it was written, its metadata and its per-step log (as written to
    ``training_metadata.json`` and ``training_log.json``)."""

    path: Path
    metadata: dict[str, Any]
    log: list[dict[str, Any]]
    rank: int = 0
    """This process's rank under ``accelerate launch`` (0, the one that writes, otherwise)."""

    @property
    def single_file(self) -> Path:
        """The single-file form of the adapter inside the run's folder."""
        return self.path / single_file_name(self.path)

    def __repr__(self) -> str:  # not the metadata and every step's log
        training = self.metadata.get("training") if isinstance(self.metadata, dict) else None
        steps = training.get("steps") if isinstance(training, dict) else None
        loss = self.final_metrics.get("loss") if isinstance(self.log, list) else None
        process = f", process={self.rank}" if self.rank else ""  # under accelerate launch
        return f"TrainResult(path={self.path!r}, steps={steps}, loss={loss}{process})"

    @property
    def final_metrics(self) -> dict[str, Any]:
        """The last logged values of :data:`FINAL_METRICS`."""
        last = next((entry for entry in reversed(self.log) if "loss" in entry), {})
        return {k: last[k] for k in FINAL_METRICS if k in last}

    def summary(self) -> dict[str, Any]:
        """The metadata plus ``final_metrics``: what the single-file form and model card record."""
        return scrub({**self.metadata, "final_metrics": self.final_metrics})


def train_preference(
    config: TrainConfig,
    output: str | Path | Output,
    *,
    swap: bool = False,
    force: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train a LoRA adapter with DPO on ``config.data`` and write it to the folder ``output``.

    ``swap`` exchanges chosen and rejected (the negative run); ``force`` replaces an earlier
    adapter folder at ``output`` and discards the checkpoints of an interrupted run; ``resume``
    continues the interrupted run from its last checkpoint in :func:`checkpoint_folder`
    (written with ``config.save_steps``) through transformers' ``resume_from_checkpoint``.
    ``progress=False`` hides the trainer's and the dataset preparation's progress bars (each
    logging step's metrics are still printed).

    Under several processes (``accelerate launch``) every process trains and returns its
    result, and only the main one writes the output (transformers has each checkpoint written
    once, by the main process, too).

    Raises:
        LoraArithError: for bad data, an unusable base model, an existing output folder
            without ``force``, leftover checkpoints without ``resume`` or ``force``, or
            ``resume`` without a checkpoint or with settings that differ from its run's.
    """
    from lora_arith.model.base import base_model_id, load_base

    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, not {type(config).__name__}")
    started = time.time()
    output = _prepare_output(config, output, force)
    checkpoints = checkpoint_folder(output.path)
    settings = run_settings(config, swap)
    resume_from = _resume_point(checkpoints, settings, resume=resume, force=force)
    pairs, report = load_pairs(
        config.data, label=config.label, swap=swap, skip_invalid=config.skip_invalid, seed=config.seed
    )
    eval_pairs, eval_report = None, None
    if config.eval_data is not None:
        eval_pairs, eval_report = load_pairs(
            [config.eval_data], label=config.label, swap=swap, skip_invalid=config.skip_invalid, seed=config.seed
        )
    device = resolve_device(config.device)
    _check_trainer_settings(config, device)
    model, tokenizer = load_base(
        config.base, quantize_4bit=config.quantize_4bit, double_quant=config.double_quant, device=device
    )
    _check_model(model, tokenizer, config)
    _keep_4bit_differentiable(model)
    keep_checkpoints = config.save_steps is not None or resume_from is not None
    with (
        _work_folder(checkpoints if keep_checkpoints else None, settings) as work_dir,
        _telemetry_disabled(),
        _dataset_bars(progress),
        peft_warnings_hidden(),
    ):
        eval_dataset = _to_dataset(eval_pairs) if eval_pairs is not None else None
        trainer = _make_trainer(
            config, model, tokenizer, _to_dataset(pairs), work_dir, device, eval_dataset, progress=progress
        )
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    try:
        _check_trained(trainer)
    except LoraArithError:
        if keep_checkpoints and trainer.accelerator.is_main_process:
            shutil.rmtree(checkpoints, ignore_errors=True)  # a run that trained nothing leaves nothing to resume
        raise
    metadata = _metadata(config, report, trainer, len(pairs), swap, base_model_id(config.base), device, started)
    if eval_report is not None:
        metadata["eval_data"] = _data_entries(eval_report)
    rank = trainer.accelerator.process_index
    result = TrainResult(output.path, scrub(metadata), scrub(_step_logs(trainer)), rank=rank)
    if trainer.accelerator.is_main_process:
        with atomic_output(output) as folder:
            _write_run(trainer.model, folder, result)
        if keep_checkpoints:
            shutil.rmtree(checkpoints, ignore_errors=True)  # the run is complete: nothing left to resume
    return result


CHECKPOINTS_SUFFIX = ".checkpoints"
"""The checkpoints of a run writing ``OUTPUT`` go to the sibling ``OUTPUT.checkpoints/``."""

RUN_SETTINGS = "run_settings.json"
"""The settings of the run that wrote a checkpoint folder, which ``resume`` must match."""

_NOT_COMPARED = ("device", "report_to", "save_steps", "logging_steps")
"""Settings a resumed run may change: they do not change what is trained."""


def checkpoint_folder(output: str | Path) -> Path:
    """Where a run writing ``output`` keeps its checkpoints: ``OUTPUT.checkpoints`` next to it.

    A sibling, not a subfolder, because the output itself is written atomically at the end:
    the checkpoints must survive a kill that leaves no output behind.
    """
    output = Path(output)
    return output.with_name(output.name + CHECKPOINTS_SUFFIX)


def last_checkpoint(folder: Path) -> Path | None:
    """The newest complete transformers checkpoint (``checkpoint-N``) in ``folder``, or None.

    transformers writes ``trainer_state.json`` last, so a checkpoint without it was cut short
    by a kill and is passed over.
    """
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    if not folder.is_dir():
        return None
    found = []
    for entry in folder.iterdir():
        match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", entry.name)
        if match and (entry / "trainer_state.json").is_file():
            found.append((int(match[1]), entry))
    return max(found)[1] if found else None


def run_settings(config: TrainConfig, swap: bool) -> dict[str, Any]:
    """What a run trains, as recorded next to its checkpoints: the settings (but
    :data:`_NOT_COMPARED`), the swap flag, and each data file as its sha256 (Hub ids as given)."""
    from lora_arith.model.base import base_model_id

    settings = asdict(config)
    for name in _NOT_COMPARED:
        settings.pop(name)
    settings["data"] = [_spec_identity(spec) for spec in config.data]
    settings["eval_data"] = _spec_identity(config.eval_data) if config.eval_data is not None else None
    settings["base"] = base_model_id(config.base)
    settings["swap"] = swap
    return json.loads(json.dumps(scrub(settings)))


def _spec_identity(spec: str) -> str:
    """A data spec as what it reads: ``sha256:HEX`` of a local file (its prefix kept), else the Hub id."""
    path = spec_file(spec)
    if path is None or not path.is_file():
        return spec
    kind = spec[: len(spec) - len(str(path))] if spec.endswith(str(path)) else ""  # e.g. "refusal:"
    return f"{kind}sha256:{sha256_of(path)}"


def _resume_point(checkpoints: Path, settings: dict[str, Any], *, resume: bool, force: bool) -> Path | None:
    """The checkpoint to continue from (``resume``), after checking its run's settings; without
    ``resume``, refuse leftover checkpoints unless ``force``, which discards them."""
    if resume:
        last = last_checkpoint(checkpoints)
        if last is None:
            raise OptionError(
                "save_steps", "nothing to resume: no checkpoint in {where} (checkpoints are written with {} N)",
                where=checkpoints,
            )
        check_same_settings(checkpoints, settings, last)
        _check_trainer_state(last)
        return last
    discard_leftovers(checkpoints, "the checkpoints of an interrupted run", force=force)
    return None


def _check_trainer_state(checkpoint: Path) -> None:
    """Raise a one-line :class:`LoraArithError` unless transformers can read ``checkpoint``'s
    ``trainer_state.json`` (it would fail inside ``train()`` on a damaged one)."""
    from transformers import TrainerState

    try:
        TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    except (OSError, ValueError, TypeError, AttributeError) as error:
        raise OptionError(
            "force", "cannot resume from {checkpoint}: its trainer_state.json is damaged ({error}); {} starts over",
            checkpoint=checkpoint, error=first_line(error),
        ) from None


def discard_leftovers(folder: Path, what: str, *, force: bool) -> None:
    """Refuse ``folder`` (holding ``what``) left by an interrupted run, unless ``force``, which
    removes it (on the main process)."""
    if not folder.exists():
        return
    if not force:
        raise OptionError(
            ("resume", "force"), "{where} holds {what}; pass {} to continue it or {} to start over", where=folder, what=what
        )
    if is_main_process():
        shutil.rmtree(folder)


def check_same_settings(folder: Path, settings: dict[str, Any], resumed: Path) -> None:
    """Raise a one-line :class:`LoraArithError` unless ``folder``'s :data:`RUN_SETTINGS` equal
    ``settings`` (from :func:`run_settings`), naming those that differ; ``resumed`` is what
    would have been resumed, for the message."""
    try:
        saved = json.loads((folder / RUN_SETTINGS).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        saved, problem = None, f"is unreadable ({first_line(error)})"
    else:
        problem = "is not a JSON object"
    if not isinstance(saved, dict):
        raise OptionError(
            "force", "cannot resume from {resumed}: its {name} {problem}; {} starts over",
            resumed=resumed, name=RUN_SETTINGS, problem=problem,
        )  # fmt: skip
    changed = sorted(key for key in settings.keys() | saved.keys() if settings.get(key) != saved.get(key))
    if changed:
        details = ", ".join(f"{key} {saved.get(key)!r} -> {settings.get(key)!r}" for key in changed)
        raise OptionError(
            ("force", "resume"),
            "cannot resume from {resumed}: the settings differ from its run's ({details}); "
            "use the same settings, or {} without {} to start over",
            resumed=resumed,
            details=details,
        )


def has_checkpoint(output: str | Path) -> bool:
    """Whether an interrupted run writing ``output`` left a complete checkpoint to resume."""
    return last_checkpoint(checkpoint_folder(output)) is not None


def is_main_process() -> bool:
    """Whether this is the main process, before accelerate is set up (``RANK`` is set by launchers)."""
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def _work_folder(checkpoints: Path | None, settings: dict[str, Any]) -> Iterator[Path]:
    """The trainer's output folder: ``checkpoints`` (kept through any kill, with the run's settings
    written into it), or with None a temporary folder removed at the end or on a signal."""
    if checkpoints is not None:
        checkpoints.mkdir(parents=True, exist_ok=True)
        if is_main_process():
            with atomic_output(checkpoints / RUN_SETTINGS, force=True) as path:
                _write_json(path, settings)
        yield checkpoints
        return
    with tempfile.TemporaryDirectory(prefix="lora-arith-train-") as work_dir, removed_on_signal(Path(work_dir)):
        yield Path(work_dir)


def _check_trained(trainer: DPOTrainer) -> None:
    """Refuse to write an adapter that training left as it started: PEFT starts ``B`` at zero, so
    such an adapter is a zero delta. The usual cause is a run no longer than its linear warm-up,
    whose learning rate starts at 0 (``--max-steps 1`` at the default warm-up ratio)."""
    if any(parameter.any() for name, parameter in trainer.model.named_parameters() if "lora_B" in name):
        return
    rates = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    steps = trainer.state.global_step
    if rates and not any(rates):
        raise OptionError(
            ("max_steps", "warmup_ratio"),
            "the learning rate was 0 at every step of the run ({steps}: a linear warm-up starts at 0), so the "
            "adapter is still zero and was not written; raise {} or lower {}",
            steps=plural(steps, "step"),
        )
    raise LoraArithError(f"after {plural(steps, 'step')} the adapter is still zero (every lora_B), so it was not written")


def _write_run(model: Any, folder: Path, result: TrainResult) -> None:
    """Write a finished run into ``folder``, each file once: the PEFT adapter and its single-file
    form (from the same in-memory tensors and config), the log, the metadata and the model card."""
    from peft.utils import get_peft_model_state_dict

    from lora_arith.lora.adapter_io import save_adapter

    model.save_pretrained(folder, save_embedding_layers=False)  # PEFT's README.md is replaced below
    tensors = get_peft_model_state_dict(model, save_embedding_layers=False)
    config = _saved_config(model)
    summary = result.summary()
    save_adapter(folder / result.single_file.name, tensors, config, training=summary)
    _write_json(folder / TRAINING_LOG, result.log)
    _write_json(folder / TRAINING_METADATA, result.metadata)
    from lora_arith.lora.adapter_io import public_config
    from lora_arith.sharing.model_card import model_card

    (folder / "README.md").write_text(model_card(public_config(config), None, summary), encoding="utf-8")


def _saved_config(model: Any) -> dict[str, Any]:
    """The adapter's config as ``save_pretrained`` wrote it, from memory: PEFT's own ``to_dict``,
    saved in inference mode, its sets (the expanded ``target_modules``) as lists."""
    config = dict(model.peft_config[model.active_adapter].to_dict(), inference_mode=True)
    return json.loads(json.dumps(config, default=list))


def single_file_name(output: Path) -> str:
    """The name of the single-file copy of the adapter inside the output folder: ``NAME.safetensors``."""
    return f"{output.name}.safetensors"


def training_inputs(config: TrainConfig) -> list[Path]:
    """The local files and folders a run reads (data files, the base), which its outputs must not touch."""
    from lora_arith.model.base import base_sources

    specs = [*config.data, *([config.eval_data] if config.eval_data is not None else [])]
    files = [spec_file(spec) for spec in specs]
    return [*(f for f in files if f is not None), *base_sources(config.base)]


def _prepare_output(config: TrainConfig, output: str | Path | Output, force: bool) -> Output:
    """Check the output before the long part (see :func:`~lora_arith._internal.atomic.check_output`): an
    existing one is replaced only with ``force``, and only an empty folder or an earlier
    adapter folder. Missing parent folders are created when the adapter is written."""
    if isinstance(output, Output):
        return output
    return check_output(output, force=force, inputs=training_inputs(config), kind="adapter", create_parents=True)


def _keep_4bit_differentiable(model: PreTrainedModel) -> None:
    """Keep a 4-bit base's layers differentiable for the whole run on a CPU.

    On a CPU with AVX-512 BF16, bitsandbytes repacks a 4-bit layer's weights for a faster kernel
    the first time the layer runs in eval mode without gradients (TRL's reference log-probs with
    ``precompute_ref``, every ``eval_data`` evaluation), for good, and that kernel has no backward:
    every later training step passed no gradient through the base's layers (the LoRA factors
    before them stopped learning; torch warned "an autograd kernel was not registered"). The
    repacking is an inference speed-up; training keeps the differentiable kernel."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):  # bitsandbytes' Linear4bit
            module.support_avx512bf16_for_cpu = False


def _check_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: TrainConfig) -> None:
    """Check the base can be trained as asked: a chat template, and the named target modules exist."""
    if not getattr(tokenizer, "chat_template", None):
        raise LoraArithError("the base model's tokenizer has no chat template; DPO here needs one")
    targets = config.target_modules()
    if targets == "all-linear":
        return
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [target for target in targets if target not in names]
    if missing:
        raise LoraArithError(f"no module named {', '.join(missing)} in the base model")


def _to_dataset(pairs: list[PreferencePair]) -> Dataset:
    """Pairs in TRL's conversational preference form (prompt messages, one assistant message per side)."""
    from datasets import Dataset

    return Dataset.from_list(
        [
            {
                "prompt": to_messages(pair.prompt),
                "chosen": [{"role": "assistant", "content": pair.chosen}],
                "rejected": [{"role": "assistant", "content": pair.rejected}],
            }
            for pair in pairs
        ]
    )


def _make_trainer(
    config: TrainConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    work_dir: Path,
    device: str,
    eval_dataset: Dataset | None = None,
    *,
    progress: bool = True,
) -> DPOTrainer:
    """A ``DPOTrainer`` with a fresh LoRA adapter on ``model``, its parameters kept in fp32."""
    from peft import LoraConfig
    from trl import DPOTrainer

    peft_config = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=config.target_modules(),
        bias="none",
        task_type="CAUSAL_LM",
    )
    trainer = DPOTrainer(
        model=model,
        args=_dpo_args(config, work_dir, device, progress=progress),
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    if len(trainer.train_dataset) == 0:
        raise OptionError(
            "max_length", "every pair's prompt fills max_length {length}; raise {}", length=config.max_length
        )
    _adapter_to_fp32(trainer.model)
    # the trainer's checkpoints save with PEFT's save_embedding_layers="auto", which asks the Hub
    # for the base's config.json at every checkpoint (a network request, and two warnings when
    # offline); the adapter never targets the embeddings, as the final write says too
    model = trainer.model
    model.save_pretrained = functools.partial(model.save_pretrained, save_embedding_layers=False)
    return trainer


def _dpo_args(config: TrainConfig, work_dir: Path, device: str, *, progress: bool = True) -> Any:
    """TRL ``DPOConfig`` for ``config``: no checkpoints, no reporting, bf16 autocast where it is fast;
    without ``progress``, no progress bar (the metrics of each logging step are printed instead)."""
    from trl import DPOConfig

    on_cuda = device.startswith("cuda")
    checkpointing = on_cuda if config.gradient_checkpointing is None else config.gradient_checkpointing
    arguments = dict(
        output_dir=str(work_dir),
        beta=config.beta,
        **_loss_args(config.sft_weight),
        learning_rate=config.lr,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        max_length=config.max_length,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,  # a float below 1 is a ratio of the total steps
        weight_decay=config.weight_decay,
        seed=config.seed,
        logging_steps=config.logging_steps,
        disable_dropout=config.dropout == 0,
        **{_checkpointing_argument(DPOConfig): checkpointing},  # TRL turns it on; on CPU it only costs time
        use_cpu=not on_cuda,
        bf16=use_bf16(config.bf16, device),
        dataloader_pin_memory=on_cuda,
        **_save_args(config.save_steps),
        **_eval_args(config),
        precompute_ref_log_probs=config.precompute_ref,
        report_to=config.report_to,
        push_to_hub=False,
        disable_tqdm=not progress,
    )
    return DPOConfig(**(arguments | config.dpo_arguments()))


def _check_trainer_settings(config: TrainConfig, device: str) -> None:
    """Build the ``DPOConfig`` and the reporting callbacks once before the base loads, so that
    what transformers or TRL refuse (an unknown ``lr_scheduler`` or ``report_to``, a reporter
    that is not installed, a ``dpo_arg`` TRL rejects) is a one-line error, not a traceback after
    the model has loaded. The trainer builds its own later, in the run's work folder."""
    from transformers.integrations import get_reporting_integration_callbacks

    try:
        with tempfile.TemporaryDirectory(prefix="lora-arith-check-") as scratch:
            args = _dpo_args(config, Path(scratch), device)
            for callback in get_reporting_integration_callbacks(args.report_to):
                callback()
    except (ValueError, TypeError, RuntimeError, ImportError) as error:
        raise LoraArithError(f"the training settings are refused by transformers or TRL: {first_line(error)}") from None


def _save_args(save_steps: int | None) -> dict[str, Any]:
    """``DPOConfig`` checkpoint arguments: a checkpoint every ``save_steps`` steps, or none."""
    if save_steps is None:
        return {"save_strategy": "no"}
    return {"save_strategy": "steps", "save_steps": save_steps}


def _eval_args(config: TrainConfig) -> dict[str, Any]:
    """``DPOConfig`` evaluation arguments: with ``eval_data``, evaluate at every logging step."""
    if config.eval_data is None:
        return {"eval_strategy": "no"}
    return {
        "eval_strategy": "steps",
        "eval_steps": config.logging_steps,
        "per_device_eval_batch_size": config.batch_size,
    }


def _loss_args(sft_weight: float) -> dict[str, Any]:
    """``DPOConfig`` loss arguments: the sigmoid DPO loss, plus the NLL of the chosen replies when
    ``sft_weight`` is positive."""
    if sft_weight == 0:
        return {"loss_type": ["sigmoid"]}
    return {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, sft_weight]}


def _checkpointing_argument(config_class: type) -> str:
    """The name of the activation-checkpointing switch of ``config_class``: transformers renamed
    ``gradient_checkpointing`` to ``activation_checkpointing`` during 5.x (5.17 has only the old name)."""
    names = {item.name for item in fields(config_class)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def _adapter_to_fp32(model: PreTrainedModel) -> None:
    """Undo TRL's bf16 cast of the trainable (LoRA) parameters on a quantized base.

    fp32 master weights keep small AdamW updates that bf16 would round away and are what the
    exact factor arithmetic downstream expects; with bf16 autocast the matmuls still run in
    bf16. Without autocast, bf16 LoRA weights next to fp32 activations are also slower on CPU.
    """
    import torch

    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


@contextlib.contextmanager
def _telemetry_disabled() -> Iterator[None]:
    """Stop TRL's trainer from sending usage telemetry to the Hub while it is built and run."""
    from huggingface_hub import constants

    previous = constants.HF_HUB_DISABLE_TELEMETRY
    constants.HF_HUB_DISABLE_TELEMETRY = True
    try:
        yield
    finally:
        constants.HF_HUB_DISABLE_TELEMETRY = previous


@contextlib.contextmanager
def _dataset_bars(shown: bool) -> Iterator[None]:
    """Hide the progress bars of ``datasets`` (TRL's tokenizing of the pairs) unless ``shown``."""
    import datasets

    hidden = not shown and datasets.is_progress_bar_enabled()
    if hidden:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if hidden:
            datasets.enable_progress_bars()


def _step_logs(trainer: DPOTrainer) -> list[dict[str, Any]]:
    """The per-logging-step entries of the trainer's log history (loss, rewards, ...), each
    step's evaluation (``eval_loss``, ``eval_rewards/...``) merged into its entry. After a
    resume it holds the steps before the interruption too (restored from the checkpoint)."""
    steps: dict[int, dict[str, Any]] = {}
    for entry in trainer.state.log_history:
        if "loss" in entry or "eval_loss" in entry:
            steps.setdefault(entry["step"], {}).update(entry)
    return list(steps.values())


def _data_entries(report: LoadReport) -> list[dict[str, Any]]:
    """One entry per data spec: the spec, pairs, skipped rows, whether templated, and its file and
    sha256 (local files) or Hub id."""
    entries = []
    for spec, rows in report.rows.items():
        path = spec_file(spec)
        entry: dict[str, Any] = {"spec": spec, "pairs": rows, "skipped": report.skipped.get(spec, 0)}
        entry["templated"] = spec in report.templated
        if path is None:
            entry["hub_dataset"] = spec  # a Hub id: NAME[:CONFIG][@REV][:SPLIT]
        else:
            entry |= {"file": path.name, "sha256": sha256_of(path)}
            entry["spec"] = public_name(spec)
        entries.append(entry)
    return entries


def _hyperparameters(config: TrainConfig) -> dict[str, Any]:
    """The training settings, without the data, base and device fields."""
    settings = asdict(config)
    for name in ("data", "base", "label", "skip_invalid", "device", "report_to", "eval_data"):
        settings.pop(name)
    settings["effective_batch_size"] = config.batch_size * config.grad_accum
    return settings


def _metadata(
    config: TrainConfig,
    report: LoadReport,
    trainer: DPOTrainer,
    pairs_loaded: int,
    swap: bool,
    base_id: str,
    device: str,
    started: float,
) -> dict[str, Any]:
    """The contents of ``training_metadata.json``."""
    summary = next((entry for entry in reversed(trainer.state.log_history) if "train_loss" in entry), {})
    pairs_used = len(trainer.train_dataset)
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base_model": base_id,
        "data": _data_entries(report),
        "swap": swap,
        "label": config.label,
        "pairs": {"loaded": pairs_loaded, "used": pairs_used, "dropped_prompt_too_long": pairs_loaded - pairs_used},
        "hyperparameters": _hyperparameters(config),
        "training": {
            "steps": trainer.state.global_step,
            "epochs": trainer.state.epoch,
            "train_loss": summary.get("train_loss"),
            "train_runtime_s": summary.get("train_runtime"),
            "bf16_autocast": trainer.args.bf16,
            "processes": trainer.accelerator.num_processes,
            "eval": _last_eval(trainer),
        },
        "device": device,
        "versions": versions(),
        "wall_time_s": round(time.time() - started, 2),
    }


def _last_eval(trainer: DPOTrainer) -> dict[str, Any] | None:
    """The last evaluation's metrics (``eval_loss``, ``eval_rewards/...``), or None without eval data."""
    entry = next((entry for entry in reversed(trainer.state.log_history) if "eval_loss" in entry), None)
    return None if entry is None else {k: v for k, v in entry.items() if k.startswith("eval_") or k == "step"}


def _write_json(path: Path, content: Any) -> None:
    """Write ``content`` as indented JSON, local paths reduced to basenames."""
    path.write_text(json.dumps(scrub(content), indent=2) + "\n", encoding="utf-8")
