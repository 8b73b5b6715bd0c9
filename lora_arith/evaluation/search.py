"""The search behind ``tune``: find the weights η that maximise one rate subject to constraints on others.

The prompts are split, stratified by kind (unsafe / safe / ordinary), into a tuning part and a
held-out part (preference pairs likewise, by the file they came from). On the tuning part the search evaluates a coarse grid over the bounds, then
refines around the best feasible point (halving the step each round) until the budget of
evaluated points is spent. The chosen point is then measured on the held-out part, where its
rates are reported with Wilson 95% intervals. The search itself is pure: it calls
``evaluate(points) -> rows`` and never touches a model.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from lora_arith._internal.errors import LoraArithError, OptionError
from lora_arith.evaluation.metrics import KINDS, METRICS, metric
from lora_arith.lora.numerics import finite_number, parse_finite

__all__ = [
    "metric_key",
    "Constraint",
    "Constraints",
    "parse_constraints",
    "parse_constraint",
    "parse_bounds",
    "search_ranges",
    "split_prompts",
    "split_pairs",
    "SearchResult",
    "search",
    "check_budget",
    "pareto_front",
    "eta_text",
]

_OPERATORS = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, "<": lambda a, b: a < b}


def metric_key(name: str) -> str:
    """The row key of a metric name (see :mod:`lora_arith.evaluation.metrics`); an unknown name is an
    error listing the valid ones."""
    return metric(name).key


@dataclass(frozen=True)
class Constraint:
    """``metric OP value``, e.g. ``compliance_rate>=0.9``."""

    metric: str
    operator: str
    value: float

    @property
    def key(self) -> str:
        return metric_key(self.metric)

    def holds(self, row: dict[str, Any]) -> bool:
        value = row.get(self.key)
        return value is not None and _OPERATORS[self.operator](value, self.value)

    def slack(self, row: dict[str, Any]) -> float:
        """How far inside the constraint a row is (negative: violated by that much)."""
        value = row.get(self.key)
        if value is None:
            return -math.inf
        return value - self.value if self.operator in (">=", ">") else self.value - value

    def __str__(self) -> str:
        return f"{self.metric}{self.operator}{self.value:g}"


@dataclass(frozen=True)
class Constraints:
    """Several constraints that must all hold; the slack of a row is its smallest slack."""

    items: tuple[Constraint, ...]

    @property
    def keys(self) -> list[str]:
        return [c.key for c in self.items]

    def holds(self, row: dict[str, Any]) -> bool:
        return all(c.holds(row) for c in self.items)

    def slack(self, row: dict[str, Any]) -> float:
        return min(c.slack(row) for c in self.items)

    def values_text(self, row: dict[str, Any]) -> str:
        """Each constrained metric's value in ``row``, e.g. ``compliance_rate 0.850``."""
        parts = []
        for c in self.items:
            value = row.get(c.key)
            parts.append(f"{c.metric} {'n/a' if value is None else f'{value:.3f}'}")
        return ", ".join(parts)

    def __str__(self) -> str:
        return " and ".join(str(c) for c in self.items)


def parse_constraints(texts: Sequence[str]) -> Constraints:
    """Parse one or more constraint texts (see :func:`parse_constraint`); all must hold."""
    if not texts:
        raise LoraArithError("give at least one constraint, e.g. 'compliance_rate>=0.9'")
    return Constraints(tuple(parse_constraint(text) for text in texts))


def parse_constraint(text: str) -> Constraint:
    """Parse ``'compliance_rate>=0.9'``; a malformed text or unknown metric is an error."""
    match = re.fullmatch(r"\s*([A-Za-z_]+)\s*(>=|<=|>|<)\s*([-+0-9.eE]+)\s*", text)
    if not match:
        raise LoraArithError(
            f"cannot read the constraint {text!r}; use METRIC>=VALUE (or <=, >, <) with METRIC one of "
            f"{', '.join(m.name for m in METRICS)}"
        )
    value = parse_finite(match.group(3))
    if value is None:
        raise LoraArithError(f"cannot read the number in the constraint {text!r}")
    name, operator = match.group(1), match.group(2)
    never = {">=": value > 1, ">": value >= 1, "<=": value < 0, "<": value <= 0}[operator]
    if metric(name).is_rate and never:  # found only after the whole search otherwise
        raise LoraArithError(f"the constraint {text.strip()!r} can never hold: {name} is a rate, between 0 and 1")
    return Constraint(name, operator, value)


def parse_bounds(
    texts: Sequence[str], names: Sequence[str], default: tuple[float, float]
) -> dict[str, tuple[float, float]]:
    """``LOW,HIGH`` (for every vector) or ``NAME=LOW,HIGH`` items → name → (low, high)."""
    ranges = []
    for text in texts:
        name, equals, rest = text.rpartition("=")
        try:
            low, high = (float(part) for part in rest.split(","))
        except ValueError:
            raise OptionError("bounds", "cannot read {} {text!r}; use LOW,HIGH or NAME=LOW,HIGH", text=text) from None
        ranges.append((name if equals else None, low, high, text))
    return search_ranges(ranges, names, default)


def search_ranges(
    ranges: Sequence[tuple[str | None, float, float, str]], names: Sequence[str], default: tuple[float, float]
) -> dict[str, tuple[float, float]]:
    """Name → (low, high) of each vector, from ``(name, low, high, as written)`` items (``name``
    ``None``: every vector); the others keep ``default``. A name must be a vector's, and
    ``low < high`` both finite."""
    bounds = {name: default for name in names}
    for name, low, high, written in ranges:
        if name is not None and name not in names:
            raise OptionError("bounds", "{} names no vector: {name}; vectors: {names}", name=name, names=", ".join(names))
        if finite_number(low) is None or finite_number(high) is None or not low < high:
            raise OptionError("bounds", "{} {text!r}: need finite LOW < HIGH", text=written)
        for target in [name] if name is not None else names:
            bounds[target] = (low, high)
    return bounds


def split_prompts(items: Sequence[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Split prompts into (tuning, held-out), stratified by kind: in each kind a share
    ``fraction`` (rounded) goes to tuning, chosen with ``seed``. A kind left empty on either
    side is an error."""
    groups = {kind: [item for item in items if item.kind == kind] for kind in KINDS}
    return _split(items, groups, fraction, seed, "the {group} prompts ({count})", "prompts")


def split_pairs(pairs: Sequence[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Split preference pairs into (tuning, held-out) as :func:`split_prompts` splits prompts,
    stratified by the file they came from (:attr:`~lora_arith.training.data.PreferencePair.origin`)."""
    groups: dict[str, list[Any]] = {}
    for pair in pairs:
        groups.setdefault(pair.origin, []).append(pair)
    return _split(pairs, groups, fraction, seed, "the pairs of {group} ({count})", "pairs")


def _split(
    items: Sequence[Any], groups: dict[str, list[Any]], fraction: float, seed: int, what: str, noun: str
) -> tuple[list[Any], list[Any]]:
    """A share ``fraction`` (rounded) of each group to tuning, the rest held out, shuffled with
    one generator seeded with ``seed`` over the groups in order; both parts keep ``items``' order."""
    if not 0.0 < fraction < 1.0:
        raise OptionError("split", "{} must be between 0 and 1 (exclusive), got {fraction:g}", fraction=fraction)
    rng = random.Random(seed)
    tuning, held_out = [], []
    for group, members in groups.items():
        if not members:
            continue
        members = list(members)
        rng.shuffle(members)
        cut = round(len(members) * fraction)
        if cut == 0 or cut == len(members):
            raise OptionError(
                "split",
                "{} {fraction:g} leaves " + what + " empty on one side; give more " + noun + " or another split",
                fraction=fraction,
                group=group,
                count=len(members),
            )
        tuning += members[:cut]
        held_out += members[cut:]
    order = {id(item): index for index, item in enumerate(items)}
    return sorted(tuning, key=lambda i: order[id(i)]), sorted(held_out, key=lambda i: order[id(i)])


def _key(point: dict[str, float]) -> tuple:
    return tuple(round(v, 9) for v in point.values())


@dataclass
class SearchResult:
    evaluated: list[dict[str, Any]]  # rows: {"eta": {...}, **flat metrics, "round": r}
    chosen: dict[str, Any] | None
    best_constraint: dict[str, Any] | None


def _better(
    row: dict[str, Any], best: dict[str, Any] | None, objective: str, sign: float, constraint: Constraint | Constraints
):
    """Whether ``row`` beats ``best``: higher objective, then more slack, then smaller |η|."""
    if best is None:
        return True

    def score(r):
        return (
            sign * (r.get(objective) if r.get(objective) is not None else -sign * math.inf),
            constraint.slack(r),
            -sum(v * v for v in r["eta"].values()),
        )

    return score(row) > score(best)


def check_budget(budget: int, dimension: int) -> None:
    """The search evaluates at least the ``2ᵈ`` corners of its coarse grid: refuse a smaller ``budget``."""
    if budget < 2**dimension:
        raise OptionError(
            "budget", "{} {budget} is too small for {dimension} vectors; give at least {least}",
            budget=budget, dimension=dimension, least=2**dimension,
        )


def search(
    evaluate: Callable[[list[dict[str, float]]], list[dict[str, Any]]],
    bounds: dict[str, tuple[float, float]],
    objective: str,
    constraint: Constraint | Constraints,
    *,
    budget: int = 40,
    minimize: bool = False,
) -> SearchResult:
    """Coarse grid, then refinement around the best feasible point, within ``budget`` points.

    ``evaluate(points)`` gets a list of name → η and returns one flat metrics row per point (it
    may evaluate them together). The coarse grid has ``k`` values per vector with ``kᵈ`` at most
    half the budget (``k ≥ 2``); each refinement round halves the step and evaluates the new
    points of the ``3ᵈ`` stencil around the current best (the best constraint value when no
    point is feasible yet)."""
    names = list(bounds)
    objective = metric_key(objective)
    sign = -1.0 if minimize else 1.0
    dimension = len(names)
    check_budget(budget, dimension)
    k = 2
    while (k + 1) ** dimension <= budget / 2:
        k += 1
    axes = {n: [lo + (hi - lo) * i / (k - 1) for i in range(k)] for n, (lo, hi) in bounds.items()}
    steps = {n: (hi - lo) / (k - 1) for n, (lo, hi) in bounds.items()}
    evaluated: list[dict[str, Any]] = []
    seen: set[tuple] = set()

    def run(points: list[dict[str, float]], round_number: int) -> None:
        rows = evaluate(points)
        for point, row in zip(points, rows):
            seen.add(_key(point))
            evaluated.append({"eta": dict(point), **row, "round": round_number})

    run([dict(zip(names, values)) for values in itertools.product(*(axes[n] for n in names))], 0)
    round_number = 0
    while len(evaluated) < budget:
        feasible = [r for r in evaluated if constraint.holds(r)]
        centre = None
        for row in feasible:
            if _better(row, centre, objective, sign, constraint):
                centre = row
        if centre is None:
            centre = max(evaluated, key=lambda r: constraint.slack(r))
        steps = {n: s / 2 for n, s in steps.items()}
        if max(steps.values()) < 1e-4:
            break
        candidates = []
        for offsets in itertools.product((-1, 0, 1), repeat=dimension):
            point = {}
            for name, offset in zip(names, offsets):
                lo, hi = bounds[name]
                point[name] = round(min(hi, max(lo, centre["eta"][name] + offset * steps[name])), 9)
            if _key(point) not in seen and point not in candidates:
                candidates.append(point)
        candidates = candidates[: budget - len(evaluated)]
        if candidates:
            round_number += 1
            run(candidates, round_number)
    chosen = None
    for row in evaluated:
        if constraint.holds(row) and _better(row, chosen, objective, sign, constraint):
            chosen = row
    best_constraint = max(evaluated, key=lambda r: constraint.slack(r))
    return SearchResult(evaluated, chosen, best_constraint)


def pareto_front(rows: Sequence[dict[str, Any]], x_key: str, y_key: str) -> list[dict[str, Any]]:
    """The rows not dominated in (higher ``x_key``, higher ``y_key``), sorted by ``x_key``."""
    valid = [r for r in rows if r.get(x_key) is not None and r.get(y_key) is not None]
    front = [
        r
        for r in valid
        if not any(
            o[x_key] >= r[x_key] and o[y_key] >= r[y_key] and (o[x_key] > r[x_key] or o[y_key] > r[y_key])
            for o in valid
        )
    ]
    return sorted(front, key=lambda r: (r[x_key], -r[y_key]))


def eta_text(eta: dict[str, float]) -> str:
    return ", ".join(f"{name}={value:g}" for name, value in eta.items())
