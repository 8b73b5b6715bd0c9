"""Evaluation of a (mixed) model: refusal and over-refusal on prompts, DPO metrics on pairs.

* On prompts marked ``should_refuse: true`` the **refusal rate** is the share of completions
  that :func:`lora_arith.evaluation.refusal.is_refusal` flags; on prompts marked ``false`` (safe, maybe
  scary-sounding, XSTest style) the **compliance rate** is the share it does not flag.
* On prompts marked ``kind: ordinary`` (everyday requests nothing should refuse, e.g. the
  held-out Alpaca instructions, see ``examples/ordinary_prompts.py``) the **ordinary
  compliance rate** is the share not flagged.
* Every rate comes with its ``n`` and a Wilson 95% interval (``*_ci``: ``[low, high]``).
* The judge that flags refusals is pluggable (:mod:`lora_arith.evaluation.judge`); the default is the
  string matcher of :mod:`lora_arith.evaluation.refusal`.
* On preference pairs, the **implicit-reward accuracy** is the share of pairs where the DPO
  reward ``β·(log π(y|x) − log π_ref(y|x))`` of the chosen reply beats the rejected one's,
  with the base (adapters disabled) as the reference; the **log-prob margin** is the mean of
  ``log π(chosen|x) − log π(rejected|x)``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from lora_arith.training.data import BadLine, read_jsonl, to_messages
from lora_arith._internal.errors import LoraArithError
from lora_arith._internal.privacy import public_name
from lora_arith.evaluation.metrics import METRICS, PROMPT_RATES
from lora_arith.evaluation.refusal import refusal_reason
from lora_arith.lora.specs import path_list

if TYPE_CHECKING:
    from lora_arith._internal.atomic import Output
    from lora_arith.evaluation.config import Adapters, EvalConfig
    from lora_arith.model.mixing import PreferenceMixer

__all__ = [
    "EvalPrompt", "EvalResult", "evaluate", "evaluate_model", "load_eval_prompts", "wilson_interval",
    "refusal_metrics", "pair_metrics", "score_prompts", "rate_text", "summary_table",
]  # fmt: skip

@dataclass(frozen=True)
class EvalPrompt:
    """A prompt with the behaviour expected of a good model."""

    prompt: Any
    should_refuse: bool
    type: str | None = None
    source: str = ""
    ordinary: bool = False

    @property
    def kind(self) -> str:
        """``"unsafe"``, ``"safe"`` or ``"ordinary"``."""
        return "ordinary" if self.ordinary else ("unsafe" if self.should_refuse else "safe")


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float] | None:
    """The Wilson score interval (95% by default) of a rate ``successes / n``; None for n = 0."""
    if n == 0:
        return None
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / denominator
    # exactly 0 (1) when no (every) item succeeded, not centre - half's rounding (5.55e-17)
    return (0.0 if successes == 0 else max(0.0, centre - half), 1.0 if successes == n else min(1.0, centre + half))


def load_eval_prompts(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[EvalPrompt]:
    """Read JSONL files (one path or a list of them) whose rows have ``prompt`` and a boolean
    ``should_refuse`` (``type`` optional); a row with ``"kind": "ordinary"`` is an ordinary
    request (``should_refuse`` may be left out and must not be true)."""
    items: list[EvalPrompt] = []
    for path in map(Path, path_list(paths, "paths")):
        if not path.is_file():
            hint = "" if path.suffix else " (prompts are JSONL files or EvalPrompt objects, not prompt texts)"
            raise LoraArithError(f"{path}: no such file{hint}")
        for number, row in read_jsonl(path):
            if isinstance(row, BadLine):
                raise LoraArithError(f"{path}:{number}: {row}")
            ordinary = isinstance(row, dict) and row.get("kind") == "ordinary"
            if ordinary and row.get("should_refuse", False) is not False:
                raise LoraArithError(f"{path}:{number}: an ordinary prompt cannot have should_refuse true")
            if ordinary:
                row = {**row, "should_refuse": False}
            if not isinstance(row, dict) or "prompt" not in row or not isinstance(row.get("should_refuse"), bool):
                raise LoraArithError(
                    f"{path}:{number}: needs a 'prompt' and a boolean 'should_refuse' (or \"kind\": \"ordinary\")"
                )
            try:
                to_messages(row["prompt"])
            except ValueError as error:
                raise LoraArithError(f"{path}:{number}: {error}") from None
            if not isinstance(row.get("type"), (str, type(None))):
                raise LoraArithError(f"{path}:{number}: 'type' must be text")
            items.append(EvalPrompt(row["prompt"], row["should_refuse"], row.get("type"), f"{path}:{number}", ordinary))
    if not items:
        raise LoraArithError("no evaluation prompts found")
    return items


def _rate(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def refusal_metrics(
    items: Sequence[EvalPrompt], completions: Sequence[str], refused: Sequence[bool] | None = None
) -> dict[str, Any]:
    """Refusal rate on should-refuse prompts, compliance rate on safe ones and on ordinary ones,
    each with its n and Wilson 95% interval (``*_ci``), and the refusal rate per type.

    ``refused`` (one flag per completion) is the judge's verdict; default: the string matcher."""
    if refused is None:
        refused = [refusal_reason(text) is not None for text in completions]
    metrics: dict[str, Any] = {}
    for rate in PROMPT_RATES:
        flags = [r == rate.counts_refusals for item, r in zip(items, refused) if item.kind == rate.kind]
        if rate.kind == "ordinary" and not flags:
            continue
        metrics[rate.key] = _rate(flags)
        metrics[rate.n_key] = len(flags)
        metrics[f"{rate.key}_ci"] = wilson_interval(sum(flags), len(flags))
    by_type: dict[str, list[bool]] = {}
    for item, r in zip(items, refused):
        by_type.setdefault(item.type or item.kind, []).append(r)
    metrics["refusal_rate_by_type"] = {t: _rate(flags) for t, flags in sorted(by_type.items())}
    metrics["n_by_type"] = {t: len(flags) for t, flags in sorted(by_type.items())}
    return metrics


def pair_metrics(
    model, tokenizer, pairs: Sequence[Any], *, beta: float = 0.1, batch_size: int = 8, reference: dict | None = None
) -> dict[str, Any]:
    """Implicit-reward accuracy (reference: the model with its adapters disabled) and the mean
    log-prob margin of chosen over rejected, overall and per pair file (``by_file``). For a model
    without adapters the accuracy is None. ``reference``, a dict, caches the reference
    log-probabilities between calls on the same pairs (sweeps compute them once)."""
    import torch

    from lora_arith.model.generation import reply_logprobs

    prompts = [pair.prompt for pair in pairs]

    def logprobs(replies):
        return reply_logprobs(model, tokenizer, prompts, replies, batch_size=batch_size)

    chosen, rejected = logprobs([p.chosen for p in pairs]), logprobs([p.rejected for p in pairs])
    rewards = None
    disable = getattr(model, "disable_adapter", None)
    if disable is not None:
        if reference is None or "chosen" not in reference:
            with disable():
                cached = {
                    "chosen": logprobs([p.chosen for p in pairs]),
                    "rejected": logprobs([p.rejected for p in pairs]),
                }
            if reference is not None:
                reference.update(cached)
        else:
            cached = reference
        ref_chosen, ref_rejected = cached["chosen"], cached["rejected"]
        rewards = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))

    def summarise(rows: list[int]) -> dict[str, Any]:
        index = torch.tensor(rows)
        picked = None if rewards is None else rewards[index]
        return {
            "n_pairs": len(rows),
            "logprob_margin": float((chosen[index] - rejected[index]).mean()),
            "reward_accuracy": None if picked is None else float((picked > 0).double().mean()),
            "reward_accuracy_ci": None if picked is None else wilson_interval(int((picked > 0).sum()), len(rows)),
            "reward_margin": None if picked is None else float(picked.mean()),
        }

    files: dict[str, list[int]] = {}
    for row, pair in enumerate(pairs):
        files.setdefault(pair.origin, []).append(row)
    names = _public_names(files)
    return {**summarise(list(range(len(pairs)))), "by_file": {names[origin]: summarise(rows) for origin, rows in files.items()}}


def _public_names(origins: Iterable[str]) -> dict[str, str]:
    """Each file's name as results (which are shared) show it: its basename, no local path
    (:func:`~lora_arith._internal.privacy.public_name`); files of the same basename are told
    apart by ``#2``, ``#3``, ... in the order given."""
    names: dict[str, str] = {}
    for origin in origins:
        name = base = public_name(origin)
        count = 1
        while name in names.values():
            count += 1
            name = f"{base}#{count}"
        names[origin] = name
    return names


def score_prompts(items: Sequence[EvalPrompt], completions: Sequence[str], judge=None) -> tuple[dict, list[dict]]:
    """Judge the completions of ``items``: (refusal metrics, one record per completion).

    ``judge`` is a :class:`lora_arith.evaluation.judge.Judge` (default: the string matcher); its name is
    recorded under ``"judge"`` in the metrics."""
    from lora_arith.evaluation.judge import StringMatchJudge

    judge = judge or StringMatchJudge()
    verdicts = judge.classify([p.prompt for p in items], list(completions))
    refused = [verdict != "full_compliance" for verdict in verdicts]
    metrics = {**refusal_metrics(items, completions, refused), "judge": judge.name}
    records = [
        {
            "prompt": p.prompt,
            "kind": p.kind,
            "should_refuse": p.should_refuse,
            "completion": c,
            "verdict": verdict,
            "refusal": refusal_reason(c) if judge.name == "strmatch" else (verdict if r else None),
        }
        for p, c, verdict, r in zip(items, completions, verdicts, refused)
    ]
    return metrics, records


def evaluate_model(
    model,
    tokenizer,
    prompts: Sequence[EvalPrompt] = (),
    pairs: Sequence[Any] = (),
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    beta: float = 0.1,
    progress: bool = False,
    judge=None,
) -> dict[str, Any]:
    """Run every metric that the given prompts and pairs allow on a loaded model (with its
    adapters at their current weights); :func:`evaluate` is the same from adapter paths.

    Returns ``{"prompts": refusal metrics, "pairs": pair metrics, "completions": [...]}``
    (keys present only for what was given). ``judge``: see :func:`score_prompts`.
    """
    from lora_arith.model.generation import generate

    result: dict[str, Any] = {}
    if prompts:
        completions = generate(
            model,
            tokenizer,
            [p.prompt for p in prompts],
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            progress=progress,
            sources=[p.source for p in prompts],
        )
        result["prompts"], result["completions"] = score_prompts(prompts, completions, judge)
    if pairs:
        result["pairs"] = pair_metrics(model, tokenizer, pairs, beta=beta, batch_size=max(1, batch_size // 2))
    return result


@dataclass
class EvalResult:
    """The metrics of one mix (``metrics["prompts"]``, ``metrics["pairs"]``), its label and
    weights, and every judged completion."""

    label: str
    weights: dict[str, float]
    metrics: dict[str, Any]
    completions: list[dict[str, Any]] = field(repr=False)
    sources: list[Path] = field(default_factory=list, repr=False)

    def __repr__(self) -> str:
        """One line: the rates (not their intervals or counts); the rest is in :attr:`metrics`."""
        rates = {
            key: round(value, 4) for key, value in self.metrics.items()
            if isinstance(value, float) and not key.startswith("n_") and not key.endswith("_ci")
        }  # fmt: skip
        shown = dict(list(rates.items())[:6])
        more = f", +{len(rates) - len(shown)} more" if len(rates) > len(shown) else ""
        return (
            f"EvalResult(label={self.label!r}, metrics={shown}{more}, completions={len(self.completions)})"
        )

    @property
    def table(self) -> str:
        """The headline metrics as a Markdown table (``summary.md``)."""
        return summary_table({self.label: self.metrics})

    def save(self, directory: str | os.PathLike[str] | Output, *, force: bool = False) -> Path:
        """Write ``results.json``, ``summary.md`` and ``completions.jsonl`` into ``directory`` at once
        (atomically); an existing folder is replaced only with ``force``."""
        from lora_arith._internal.atomic import atomic_output

        with atomic_output(directory, kind="eval", force=force, inputs=self.sources) as temporary:
            results = {"model": self.label, "weights": self.weights, **self.metrics}
            (temporary / "results.json").write_text(json.dumps(results, indent=1))
            (temporary / "summary.md").write_text(self.table + "\n")
            (temporary / "completions.jsonl").write_text(
                "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in self.completions)
            )
        return Path(directory)


def evaluate(
    adapters: Adapters | None = None,
    *,
    prompts: Sequence[Any] | str | os.PathLike[str] = (),
    pairs: Sequence[Any] | str | os.PathLike[str] = (),
    limit: int | None = None,
    max_pairs: int | None = None,
    label: str | None = None,
    mixer: PreferenceMixer | None = None,
    progress: bool = False,
    config: EvalConfig | None = None,
    **settings: Any,
) -> EvalResult:
    """Measure refusal, over-refusal and DPO metrics of the base with ``adapters`` mixed in.

    Args:
        adapters: name → adapter path (weight 1) or :class:`~lora_arith.lora.specs.AdapterSpec`;
            none: the base alone.
        prompts: evaluation prompts: JSONL paths (XSTest style, see :func:`load_eval_prompts`) or
            :class:`EvalPrompt` objects.
        pairs: preference pairs (JSONL paths or :class:`~lora_arith.training.data.PreferencePair`)
            for the implicit-reward accuracy and log-prob margin.
        limit, max_pairs: keep the first N prompts of each kind, the first N pairs of each file.
        label: ``helpful`` or ``harmless``, for pair files of PKU-SafeRLHF records.
        mixer: evaluate this loaded :class:`~lora_arith.model.mixing.PreferenceMixer` at its current
            weights instead of loading ``adapters`` on the base (``base``, ``quantize_4bit`` and
            ``device`` are the mixer's then, and left out).
        config, settings: an :class:`~lora_arith.evaluation.config.EvalConfig`, or its fields as
            keywords (``base=``, ``max_new_tokens=``, ``judge=``, ...).

    Returns:
        an :class:`EvalResult` (``.metrics``, ``.table``, ``.save(directory)``).

    Raises:
        TypeError: arguments of the wrong kind (both ``adapters`` and ``mixer``, prompts that are
            not paths or :class:`EvalPrompt` objects).
        LoraArithError: unreadable prompts, pairs or adapters, or a setting that cannot work.
    """
    from lora_arith.evaluation.config import EvalConfig, adapter_specs, load_inputs

    config = EvalConfig.build(config, settings, "evaluate")
    if mixer is not None and adapters:
        raise TypeError("evaluate() takes adapters or a mixer, not both")
    specs = adapter_specs(adapters or {})
    config = config.on_mixer(mixer)
    inputs = load_inputs(prompts, pairs, limit=limit, max_pairs=max_pairs, label=label)
    judge = config.make_judge()
    if mixer is None:
        mixer = config.mixer(specs)
    metrics = evaluate_model(
        mixer.model, mixer.tokenizer, inputs.prompts, inputs.pairs, progress=progress, judge=judge,
        **config.generation(),
    )  # fmt: skip
    mix = " + ".join(f"{w:g}·{n}" for n, w in mixer.weights.items()) or "base"
    completions = metrics.pop("completions", [])
    sources = config.sources([spec.path for spec in specs.values()], inputs.files)
    return EvalResult(mix, dict(mixer.weights), metrics, completions, sources)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def rate_text(metrics: dict[str, Any], key: str, n_key: str | None = None) -> str:
    """``"97.4% [93.6–99.0], n=117"``: a rate with its Wilson 95% interval and n, or ``n/a``."""
    value = metrics.get(key)
    if value is None:
        return "n/a"
    interval = metrics.get(f"{key}_ci")
    if interval is None and metrics.get(f"{key}_lo") is not None:  # a flat sweep/tune row
        interval = (metrics[f"{key}_lo"], metrics[f"{key}_hi"])
    n = metrics.get(n_key) if n_key else None
    text = _percent(value)
    if interval:
        text += f" [{100 * interval[0]:.1f}–{100 * interval[1]:.1f}]"
    return text + (f", n={n}" if n is not None else "")


def summary_table(rows: dict[str, dict[str, Any]]) -> str:
    """A Markdown table of the headline metrics, one row per evaluated configuration; every rate
    with its Wilson 95% interval and n (the ordinary column only where some row has it)."""
    shown = [
        m for m in METRICS
        if m.kind != "ordinary" or any(m.key in result.get("prompts", {}) for result in rows.values())
    ]  # fmt: skip
    header = "| model |" + "".join(f" {m.column} ↑ |" for m in shown)
    lines = [header, "| --- " * header.count(" |") + "|"]
    for name, result in rows.items():
        cells = [name]
        for m in shown:
            values = result.get(m.part, {})
            if m.is_rate:
                cells.append(rate_text(values, m.key, m.n_key))
            else:
                cells.append("n/a" if values.get(m.key) is None else f"{values[m.key]:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    judges = sorted({r["prompts"]["judge"] for r in rows.values() if "judge" in r.get("prompts", {})})
    if judges:
        lines.append("")
        lines.append(f"Refusals judged by: {', '.join(judges)}. Intervals: Wilson 95%.")
    return "\n".join(lines)
