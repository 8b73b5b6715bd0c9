"""Print the Markdown table of the tuned results written by examples/tune_default_base.sh.

Usage: python examples/tune_table.py [examples/results/tune]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lora_arith.evaluation.evaluate import rate_text
from lora_arith.evaluation.search import eta_text

RUNS = [
    ("pair", "helpful + harmless, tuned (bounds 0..2 each)"),
    ("union", "union baseline, tuned (η in 0..3)"),
    ("helpful", "helpful alone, tuned (η in 0..3)"),
    ("harmless", "harmless alone, tuned (η in 0..3)"),
]


def cells(row: dict) -> list[str]:
    return [
        rate_text(row, "refusal_rate_unsafe", "n_unsafe"),
        rate_text(row, "compliance_rate_safe", "n_safe"),
        rate_text(row, "ordinary_compliance_rate", "n_ordinary"),
    ]


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "examples/results/tune")
    print(
        "| model | chosen η | points searched | held-out refusal (unsafe) ↑ | held-out compliance (safe) | "
        "held-out compliance (ordinary) |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for name, label in RUNS:
        path = folder / name / "report.json"
        if not path.is_file():
            print(f"| {label} | (not run / failed: see {name}.log) | | | | |")
            continue
        report = json.loads(path.read_text())
        chosen = report["chosen"]
        print(
            f"| {label} | {eta_text(chosen['eta'])} | {len(report['evaluated'])} | "
            + " | ".join(cells(chosen["held_out"]))
            + " |"
        )
        if name == "pair":
            for other, entry in report["compare"].items():
                print(
                    f"| {other} at η = {entry['weight']:g} (not tuned) | {entry['weight']:g} | – | "
                    + " | ".join(cells(entry["held_out"]))
                    + " |"
                )
    any_report = next((folder / n / "report.json" for n, _ in RUNS if (folder / n / "report.json").is_file()), None)
    if any_report:
        report = json.loads(any_report.read_text())
        print()
        print(
            f"Constraint {report['constraint']} on the tuning half, refusal maximised; base {report['base']}; "
            f"{report['max_new_tokens']} new tokens, greedy; judge {report['judge']}; split {report['split']:g} "
            f"(seed {report['seed']}): tuning {report['n_prompts']['tuning']}, held-out {report['n_prompts']['held_out']}. "
            "Rates: Wilson 95% intervals, n."
        )


if __name__ == "__main__":
    main()
