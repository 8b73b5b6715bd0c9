"""The extendability table of docs/results.md ("Adding a preference"): helpful and harmless at (1, 1),
the concise vector at η ∈ {0, 0.5, 1}.

    python examples/measure_concise.py                # from the repository root, after the runs below

Reads what ``lora-arith generate`` and ``lora-arith eval`` wrote (the commands are in
examples/results/concise/README.md) and prints a Markdown table:

* words per reply (whitespace-separated tokens of the reply) on the held-out ordinary prompts
  (the last 200 lines of ``helpful/alpaca_demo.jsonl``; every η is compared on the same first
  prompts, as many as every η has replies for): mean and share under 60 words;
* refusal rate on the unsafe and compliance rate on the safe XSTest eval prompts, with Wilson 95%
  intervals (lora_arith/evaluation/refusal.py's detector, as ``eval`` applies it);
* implicit-reward accuracy on the eval pairs (``eval --pairs``).

With ``--side-by-side N`` it also prints the first N held-out prompts with their replies at the
first and last η, and the number of replies at the last η that answer: a reply counts as an
answer when it is not a refusal (the same detector), is not empty, and has at least 3 words.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from lora_arith.evaluation.evaluate import wilson_interval
from lora_arith.evaluation.refusal import refusal_reason

RESULTS = Path("examples/results")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def words(text: str) -> int:
    return len(text.split())


def answers(reply: str) -> bool:
    return refusal_reason(reply) is None and words(reply) >= 3


def percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def rate_cell(rate: float, total: int) -> str:
    successes = round(rate * total)
    low, high = wilson_interval(successes, total) or (math.nan, math.nan)
    return f"{percent(rate)} [{percent(low)}, {percent(high)}] ({successes}/{total})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--eta", nargs="+", default=["0", "0.5", "1"], help="the η_concise values measured")
    parser.add_argument(
        "--eval-dir",
        nargs="+",
        default=[str(RESULTS / "both"), str(RESULTS / "concise/xstest_eta0.5"), str(RESULTS / "concise/xstest_eta1")],
        help="one lora-arith eval output folder per η (η = 0 is helpful + harmless alone: examples/results/both)",
    )
    parser.add_argument(
        "--heldout-dir", default=str(RESULTS / "concise"), help="where the heldout_eta<η>.jsonl replies are"
    )
    parser.add_argument("--side-by-side", type=int, default=20)
    args = parser.parse_args()
    lengths = {}
    header = "| η_concise | mean words (held-out) | replies < 60 words | refusal (unsafe XSTest) | compliance (safe XSTest) | reward acc. (eval pairs) |"
    print(header)
    print("| --- | --- | --- | --- | --- | --- |")
    available = [eta for eta in args.eta if (Path(args.heldout_dir) / f"heldout_eta{eta}.jsonl").is_file()]
    generated = {eta: read_jsonl(Path(args.heldout_dir) / f"heldout_eta{eta}.jsonl") for eta in available}
    common = min((len(r) for r in generated.values()), default=0)  # compared on the same first prompts
    for eta, eval_dir in zip(args.eta, args.eval_dir):
        if eta in generated:
            replies = generated[eta][:common]
            counts = [words(r["completion"]) for r in replies]
            lengths[eta] = replies
            cells = [f"{statistics.mean(counts):.1f} (n = {len(counts)})", percent(sum(c < 60 for c in counts) / len(counts))]
        else:
            cells = ["not measured"] * 2
        results_path = Path(eval_dir) / "results.json"
        if results_path.is_file():
            result = json.loads(results_path.read_text())
            prompts, pairs = result["prompts"], result.get("pairs", {})
            cells.append(rate_cell(prompts["refusal_rate_unsafe"], prompts["n_unsafe"]))
            cells.append(rate_cell(prompts["compliance_rate_safe"], prompts["n_safe"]))
            cells.append(f"{percent(pairs['reward_accuracy'])} (n = {pairs['n_pairs']})" if pairs else "–")
        else:
            cells += ["not measured"] * 3
        print(f"| {eta} | " + " | ".join(cells) + " |")
    for eta, replies in generated.items():
        if len(replies) > common:
            counts = [words(r["completion"]) for r in replies]
            print(
                f"\nη = {eta} on all {len(counts)} held-out prompts: mean {statistics.mean(counts):.1f} words, "
                f"{percent(sum(c < 60 for c in counts) / len(counts))} under 60"
            )
    if len(lengths) < 2:
        return
    first, last = list(lengths)[0], list(lengths)[-1]
    mean_first = statistics.mean(words(r["completion"]) for r in lengths[first])
    mean_last = statistics.mean(words(r["completion"]) for r in lengths[last])
    print(f"\nmean words at η = {last} vs {first}: {100 * (mean_last / mean_first - 1):+.1f}%")
    if args.side_by_side:
        pairs = list(zip(lengths[first], lengths[last]))[: args.side_by_side]
        answered = [answers(b["completion"]) for _, b in pairs]
        answered_first = [answers(a["completion"]) for a, _ in pairs]
        print(
            f"\nside by side, the first {len(pairs)} held-out prompts: {sum(answered)}/{len(pairs)} replies at "
            f"η = {last} answer ({sum(answered_first)}/{len(pairs)} at η = {first}); an answer is not a refusal "
            "(lora_arith/evaluation/refusal.py) and has at least 3 words\n"
        )
        for number, (a, b) in enumerate(pairs, 1):
            print(f"{number}. {a['prompt'][:120]!r}")
            print(f"   η={first} ({words(a['completion'])} words): {a['completion'][:300]!r}")
            print(f"   η={last} ({words(b['completion'])} words): {b['completion'][:300]!r}")


if __name__ == "__main__":
    main()
