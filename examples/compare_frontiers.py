"""Put two ``lora-arith tune`` runs' frontiers on one plot and say whether one dominates the other.

    python examples/compare_frontiers.py OLD_TUNE_DIR NEW_TUNE_DIR -o frontiers.png \
        [--label old --label new] [--ordinary-at-least 0.95]

Both runs must use the same prompts, split and seed (their report.json says so; checked). Each run's
evaluated points on the tuning prompts are drawn in the (safe compliance, unsafe refusal) plane; the
points whose ordinary compliance is below ``--ordinary-at-least`` are drawn hollow and left out of
that run's Pareto frontier. The verdict: NEW dominates OLD when every point of OLD's frontier is
matched or beaten, in both rates, by some point of NEW's frontier, and at least one strictly.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lora_arith._internal.atomic import atomic_output
from lora_arith.evaluation.search import pareto_front

X, Y, ORDINARY = "compliance_rate_safe", "refusal_rate_unsafe", "ordinary_compliance_rate"


def load(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text(encoding="utf-8"))


def eligible(rows: list[dict], floor: float) -> list[dict]:
    return [r for r in rows if r.get(ORDINARY) is None or r[ORDINARY] >= floor]


def dominates(new: list[dict], old: list[dict]) -> bool:
    covered = all(any(n[X] >= o[X] and n[Y] >= o[Y] for n in new) for o in old)
    strictly = any(any(n[X] >= o[X] and n[Y] >= o[Y] and (n[X] > o[X] or n[Y] > o[Y]) for n in new) for o in old)
    return covered and strictly


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--label", action="append", help="names of the two runs (default: old, new)")
    parser.add_argument("--ordinary-at-least", type=float, default=0.95)
    parser.add_argument("-f", "--force", action="store_true")
    args = parser.parse_args(argv)
    labels = args.label or ["old", "new"]
    if args.output.exists() and not args.force:
        print(f"Error: {args.output} exists (use --force)", file=sys.stderr)
        return 1
    reports = [load(args.old), load(args.new)]
    for key in ("split", "seed", "n_prompts", "max_new_tokens"):
        if reports[0][key] != reports[1][key]:
            print(f"Error: the two runs differ in {key}: {reports[0][key]} vs {reports[1][key]}", file=sys.stderr)
            return 1

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.8))
    fronts = []
    for report, label, colour in zip(reports, labels, ("tab:gray", "tab:blue")):
        rows = [r for r in report["evaluated"] if r.get(X) is not None and r.get(Y) is not None]
        good = eligible(rows, args.ordinary_at_least)
        low = [r for r in rows if r not in good]
        axes.scatter([r[X] for r in good], [r[Y] for r in good], s=18, color=colour, alpha=0.7)
        axes.scatter([r[X] for r in low], [r[Y] for r in low], s=18, facecolors="none", edgecolors=colour, alpha=0.7)
        front = pareto_front(good, X, Y)
        fronts.append(front)
        axes.plot([r[X] for r in front], [r[Y] for r in front], "-o", color=colour, ms=4,
                  label=f"{label}: frontier (ordinary ≥ {args.ordinary_at_least:g})")  # fmt: skip
        chosen = report["chosen"]["tuning"]
        axes.scatter([chosen[X]], [chosen[Y]], marker="*", s=200, color=colour, edgecolors="black", zorder=5,
                     label=f"{label}: chosen")  # fmt: skip
    axes.axvline(0.9, color="tab:red", ls="--", lw=1, label="compliance_rate>=0.9")
    axes.set_xlabel("compliance rate (safe XSTest, tuning half)")
    axes.set_ylabel("refusal rate (unsafe XSTest, tuning half)")
    axes.set_title("tune frontiers; hollow: ordinary compliance below the floor")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="best")
    figure.tight_layout()
    with atomic_output(args.output, force=args.force) as temporary:
        figure.savefig(temporary, dpi=120, format="png")
    for label, front in zip(labels, fronts):
        points = ", ".join(f"({r[X]:.3f}, {r[Y]:.3f})" for r in front)
        print(f"{label} frontier (compliance, refusal): {points or 'empty'}")
    verdict = dominates(fronts[1], fronts[0])
    print(f"{labels[1]} dominates {labels[0]}: {'yes' if verdict else 'no'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
