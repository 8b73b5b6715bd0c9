"""Write the form-contrast pairs for the harmless-vector experiment of issue 18
(examples/data/harmless_form_contrast.jsonl).

    python examples/make_form_contrast_pairs.py                 # from the repository root
    python examples/make_form_contrast_pairs.py --data ../shared/data -o examples/data/harmless_form_contrast.jsonl

The shipped harmless vector learned "a task-shaped request -> refuse": its templated refusals are
AdvBench and Do-Not-Answer requests, and it refuses ordinary word problems too. These pairs have
prompts of the same form (one- or two-sentence imperative tasks and questions, word problems) on
which the **answer is chosen and a refusal rejected**, so that refusing must key on the content.

Sources (never ``eval/``, never the last 200 lines of ``helpful/alpaca_demo.jsonl``, which are the
held-out ordinary prompts):

* ``helpful/alpaca_demo.jsonl`` lines 1-799: instruction -> the file's (model-written) answer;
* ``helpful/general_pairs.jsonl``: the single-turn rows whose prompt has at most ``--max-words``
  words, with the row's chosen reply.

The rejected reply is one of the SAME refusal templates the harmful pairs use as their chosen reply
(``lora_arith.training.data.REFUSALS``), so the refusal text itself carries no signal: only the prompt does.

**Count.** The shipped harmless data has 1700 harmful pairs; these sources give about half as many
usable prompts, so each prompt is written ``--copies`` times (default 2), each copy with a different
refusal drawn by a seeded RNG, which roughly matches the count. The length distribution (words per
prompt) is printed beside the harmful prompts' to stderr.

The pairs are **templated** (the rejected side), not labelled by people. Deterministic.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

from lora_arith._internal.atomic import atomic_output
from lora_arith.training.data import REFUSALS

HELD_OUT = 200
HARMFUL = ("harmless/xstest_unsafe_pairs.jsonl", "harmless/advbench_behaviors.jsonl", "harmless/donotanswer_prompts.jsonl")


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def user_text(prompt) -> str | None:
    """The prompt as one user turn, or None for a multi-turn prompt."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and prompt[0].get("role") == "user":
        return prompt[0]["content"]
    return None


def words(text: str) -> int:
    return len(text.split())


def deciles(values: list[int]) -> list[int]:
    return [round(q) for q in statistics.quantiles(values, n=10)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data", help="the shared data folder")
    parser.add_argument("-o", "--output", default="examples/data/harmless_form_contrast.jsonl")
    parser.add_argument("--max-words", type=int, default=40, help="longest general_pairs prompt kept (words)")
    parser.add_argument("--copies", type=int, default=2, help="pairs written per prompt, each with another refusal")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-f", "--force", action="store_true")
    args = parser.parse_args(argv)
    data, output = Path(args.data), Path(args.output)
    if output.exists() and not args.force:
        print(f"Error: {output} exists (use --force)", file=sys.stderr)
        return 1

    alpaca = read(data / "helpful/alpaca_demo.jsonl")
    rows = []  # (id, prompt, answer)
    for record in alpaca[: len(alpaca) - HELD_OUT]:
        rows.append((record["id"], record["prompt"], record["response"]))
    for record in read(data / "helpful/general_pairs.jsonl"):
        text = user_text(record["prompt"])
        if text is not None and words(text) <= args.max_words:
            rows.append((record["id"], text, record["chosen"]))

    pairs = []
    for copy in range(args.copies):
        for row_id, prompt, answer in rows:
            rng = random.Random(f"{args.seed}:{copy}:{row_id}")
            pairs.append({"prompt": prompt, "chosen": answer, "rejected": rng.choice(REFUSALS),
                          "id": f"form-contrast-{row_id}-{copy}"})

    harmful = [user_text(r["prompt"]) for name in HARMFUL for r in read(data / name)]
    ours = [prompt for _, prompt, _ in rows]
    print(f"harmful prompts: {len(harmful)}, words per prompt deciles {deciles([words(p) for p in harmful])}",
          file=sys.stderr)
    print(f"contrast prompts: {len(ours)} × {args.copies} = {len(pairs)} pairs, "
          f"words per prompt deciles {deciles([words(p) for p in ours])}", file=sys.stderr)

    with atomic_output(output, force=args.force) as temporary:
        temporary.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
