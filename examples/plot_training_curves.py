"""Plot the loss and reward-accuracy curves of DPO runs from their ``training_log.json``.

    python examples/plot_training_curves.py RUN_DIR [RUN_DIR ...] -o curves.png [--label NAME ...] [--window 10]

Each RUN_DIR is a ``lora-arith train`` output folder (it holds ``training_log.json``, one record per
logged step). Raw values are drawn thin, a trailing moving average of ``--window`` steps thick. The
last moving-average values are printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lora_arith._internal.atomic import atomic_output


def moving_average(values: list[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--label", action="append")
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("-f", "--force", action="store_true")
    args = parser.parse_args(argv)
    labels = args.label or [run.name for run in args.runs]
    if len(labels) != len(args.runs):
        print("Error: give one --label per run", file=sys.stderr)
        return 1
    if args.output.exists() and not args.force:
        print(f"Error: {args.output} exists (use --force)", file=sys.stderr)
        return 1
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 4))
    for run, label in zip(args.runs, labels):
        log = [r for r in json.loads((run / "training_log.json").read_text()) if "loss" in r]
        steps = [r["step"] for r in log]
        for axes, key in ((loss_axes, "loss"), (accuracy_axes, "rewards/accuracies")):
            values = [r[key] for r in log]
            smooth = moving_average(values, args.window)
            line = axes.plot(steps, smooth, lw=2, label=label)[0]
            axes.plot(steps, values, lw=0.6, alpha=0.35, color=line.get_color())
            print(f"{label}: {key} over the last {args.window} steps {smooth[-1]:.3f} (step {steps[-1]})")
    loss_axes.set_title("DPO loss")
    accuracy_axes.set_title("reward accuracy (batch)")
    for axes in (loss_axes, accuracy_axes):
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.tight_layout()
    with atomic_output(args.output, force=args.force) as temporary:
        figure.savefig(temporary, dpi=110, format="png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
