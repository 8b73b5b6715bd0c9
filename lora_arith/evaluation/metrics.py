"""The one registry of metrics and prompt kinds: every name a metric goes by, the prompts it is
measured on, its ``n``, and how tables and plots label it. Evaluation, sweeps, ``tune`` and the
reports all read it from here."""

from __future__ import annotations

from dataclasses import dataclass

from lora_arith._internal.errors import LoraArithError

__all__ = ["KINDS", "Metric", "METRICS", "PROMPT_RATES", "FLAT_RATES", "metric"]

KINDS = ("unsafe", "safe", "ordinary")
"""Prompt kinds: should-refuse, safe (maybe scary-sounding), and ordinary requests."""


@dataclass(frozen=True)
class Metric:
    """One metric. ``name``: what ``tune`` accepts; ``key``: its key in results and flat rows;
    ``label`` and ``column``: its long (plot) and short (table) labels; ``part``: where an
    evaluation result holds it (``"prompts"`` or ``"pairs"``); ``n_key``: the key of its sample
    size (None for a mean, which has no interval); ``kind``: the prompt kind it is measured on
    (None for pair metrics); ``counts_refusals``: whether a prompt rate counts refusals or
    compliance."""

    name: str
    key: str
    label: str
    column: str
    part: str
    n_key: str | None
    kind: str | None = None
    counts_refusals: bool = False

    @property
    def is_rate(self) -> bool:
        """A share with a Wilson interval (every metric but the log-prob margin)."""
        return self.n_key is not None


METRICS: tuple[Metric, ...] = (
    Metric("refusal_rate", "refusal_rate_unsafe", "refusal rate on unsafe prompts", "refusal (unsafe)", "prompts",
           "n_unsafe", "unsafe", counts_refusals=True),
    Metric("compliance_rate", "compliance_rate_safe", "compliance rate on safe prompts", "compliance (safe)", "prompts",
           "n_safe", "safe"),
    Metric("ordinary_compliance_rate", "ordinary_compliance_rate", "compliance rate on ordinary prompts",
           "compliance (ordinary)", "prompts", "n_ordinary", "ordinary"),
    Metric("reward_accuracy", "reward_accuracy", "implicit-reward accuracy", "reward acc.", "pairs", "n_pairs"),
    Metric("logprob_margin", "logprob_margin", "log-prob margin (chosen − rejected)", "log-prob margin", "pairs", None),
)  # fmt: skip
"""Every metric, in the order tables and heatmaps list them."""

PROMPT_RATES: tuple[Metric, ...] = tuple(m for m in METRICS if m.kind is not None)
"""The rates measured on prompts, one per prompt kind."""

FLAT_RATES: tuple[Metric, ...] = tuple(m for m in METRICS if m.is_rate)
"""The rates a flat sweep or tune row carries with their Wilson bounds and n."""

_BY_NAME = {**{m.key: m for m in METRICS}, **{m.name: m for m in METRICS}}


def metric(name: str) -> Metric:
    """The metric called ``name`` (its short name or its key); an unknown name is an error that
    lists the valid ones."""
    found = _BY_NAME.get(name)
    if found is None:
        raise LoraArithError(f"unknown metric {name!r}; valid metrics: {', '.join(m.name for m in METRICS)}")
    return found
