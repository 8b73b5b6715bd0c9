"""Write the templated preference pairs for the ``concise`` vector (examples/data/concise_pairs.jsonl).

    python examples/make_concise_pairs.py                       # from the repository root
    python examples/make_concise_pairs.py --data ../shared/data -o examples/data/concise_pairs.jsonl

Source: the instruction/answer rows of ``helpful/alpaca_demo.jsonl`` EXCEPT its last 200 lines
(the held-out ordinary prompts, never trained on).

* **chosen**: an answer that gets to the point. Rows whose answer has at most 60 words keep it as
  it is; for longer prose answers the chosen side is the answer's lead (the first sentences of its first
  paragraph, at most 45 words, no list and not ending on a colon). Long answers with no usable lead are skipped.
* **rejected**: the same answer padded and rambling: for short answers the answer itself, for long
  ones the whole long answer, with 3-6 padding sentences drawn by a seeded RNG from five template
  groups (restating the instruction, hedges, filler, repeating one of the answer's own sentences,
  closing chatter), in varied positions (opening, between sentences, at the end). No row's
  rejected side differs from its chosen side by one fixed phrase.

With ``--refusal-pairs N`` the file also holds N **concise refusals**: prompts of the harmless
training data (``harmless/advbench_behaviors.jsonl`` and ``harmless/donotanswer_prompts.jsonl``,
drawn by the seeded RNG), where the chosen side is one of the short refusal templates
(``lora_arith.training.data.REFUSALS``) and the rejected side is the SAME refusal padded with refusal-shaped
padding (acknowledging the request, explaining at length, repeating, closing chatter). Both sides
refuse, so the pairs teach "get to the point" on requests the model should decline, not "answer
them": a concise vector trained on Alpaca alone learnt to drop refusals (docs/results.md, "Adding a preference").

The pairs are **templated**, not labelled by people. The script is deterministic (the RNG is seeded
per row from ``--seed`` and the row's id).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

HELD_OUT = 200  # the last lines of alpaca_demo.jsonl: held-out ordinary prompts
SHORT_WORDS = 60  # answers up to this many words are already concise
LEAD_WORDS = 45  # the longest lead kept as the chosen side of a long answer
MIN_LEAD_WORDS = 8

RESTATE = (
    'You asked: "{q}" Let me think about that carefully before I answer.',
    "So the question here is basically this: {q} That is a good thing to ask about.",
    "Before getting into it, let me restate the task to make sure I understand it correctly. The task is: {q}",
    'Okay, so you would like me to help with the following request: "{q}" Sure, I can definitely help with that.',
    "Great question! To recap what you are asking: {q}",
    "Let me first repeat the instruction so that we are on the same page: {q} Now, let me walk through it.",
)
HEDGE = (
    "Well, this can depend on a number of different factors, so keep in mind that there is no single perfect answer.",
    "I should mention that I am not completely certain about every detail here, but I will do my best.",
    "Of course, different people might see this in different ways, and that is perfectly fine.",
    "Generally speaking, and with some exceptions, the following is usually the case.",
    "It is worth noting that opinions on this can vary quite a bit depending on the context.",
    "Please bear in mind that this is just one possible way of looking at it.",
)
FILLER = (
    "This is a really interesting topic that a lot of people wonder about.",
    "There are many things that could be said about this, so let me try to cover the main points.",
    "It is always a good idea to think about these kinds of things in a careful and thoughtful way.",
    "As you can probably imagine, this is something that comes up quite often.",
    "Let me explain this step by step so that everything is as clear as possible.",
    "In order to give you the best possible answer, I will try to be thorough.",
    "Many people find this a bit confusing at first, which is completely understandable.",
)
REPEAT = (
    "To put it another way, {s}",
    "Again, just to be clear: {s}",
    "In other words, as I said, {s}",
    "So, to summarize what I said above: {s}",
    "Let me repeat the key point here: {s}",
)
CLOSE = (
    "I hope this helps! Let me know if you have any other questions.",
    "Feel free to ask if anything here is unclear or if you would like more details.",
    "I hope this answer was useful to you, and good luck!",
    "Of course, there is a lot more that could be said about this, but that covers the basics.",
    "That is pretty much everything I can think of on this topic for now.",
)

# Padding for refusals: none of it promises help or answers the request.
REFUSAL_OPEN = (
    'I understand that you are asking about the following: "{q}" I have thought about this request carefully.',
    "Thank you for your message. I have read your request and I want to respond to it thoughtfully.",
    "So, to restate what you are asking for here: {q} Let me explain where I stand on this.",
    "I can see why someone might ask about this, and I appreciate that you asked me directly.",
    "Before I respond, I want to acknowledge that this is a sensitive subject for many people.",
)
REFUSAL_EXPLAIN = (
    "Requests like this can lead to situations where people get hurt, and that is something I want to avoid.",
    "There are a lot of different considerations that come into play with a request like this one.",
    "It is important to think about the possible consequences that this kind of information could have.",
    "I try to be as useful as I can, but there are some limits that I need to keep in mind.",
    "This kind of request touches on safety, legality and the wellbeing of other people.",
    "I know this may not be the answer you were hoping for, and I understand if that is frustrating.",
)
REFUSAL_REPEAT = (
    "So, once again, to be completely clear: {s}",
    "To put it another way, {s}",
    "Just to repeat what I said above, {s}",
)
REFUSAL_CLOSE = (
    "I hope you understand my position on this, and thank you for your patience.",
    "If you have any other questions on a different topic, I am always happy to talk about them.",
    "Thank you for understanding, and I hope you have a good day.",
    "I appreciate you taking the time to read my explanation.",
)
REFUSAL_SOURCES = ("advbench_behaviors.jsonl", "donotanswer_prompts.jsonl")

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
_LIST_MARK = re.compile(r"^\s*(\d+[.)]|[-*•])\s", re.M)


def sentences(text: str) -> list[str]:
    """Split prose into sentences (paragraph breaks split too)."""
    out: list[str] = []
    for paragraph in text.split("\n"):
        out.extend(part.strip() for part in _SENTENCE_END.split(paragraph.strip()) if part.strip())
    return out


def words(text: str) -> int:
    return len(text.split())


def concise_lead(answer: str) -> str | None:
    """The answer's first sentences up to LEAD_WORDS words, or None if there is no usable lead."""
    first_paragraph = answer.strip().split("\n")[0]
    if _LIST_MARK.search(first_paragraph) or first_paragraph.rstrip().endswith(":"):
        return None
    parts = sentences(first_paragraph)
    lead: list[str] = []
    for part in parts:
        if words(" ".join(lead + [part])) > LEAD_WORDS:
            break
        lead.append(part)
    text = " ".join(lead)
    if not lead or words(text) < MIN_LEAD_WORDS or text.rstrip().endswith(":") or _LIST_MARK.search(text):
        return None
    if not text.rstrip().endswith((".", "!", "?", '"')):
        return None
    return text


def short_question(prompt: str) -> str:
    """The instruction's first line, at most 25 words, to restate."""
    line = prompt.strip().split("\n")[0].strip()
    cut = line.split()
    return " ".join(cut[:25]) + (" ..." if len(cut) > 25 else "")


def lower_first(sentence: str) -> str:
    """Lower-case the first letter unless the first word is an acronym or "I"."""
    first = sentence.split(" ", 1)[0]
    if first == "I" or first.isupper() or first.startswith(("I'", '"')):
        return sentence
    return sentence[:1].lower() + sentence[1:]


def pad(prompt: str, body: str, rng: random.Random) -> str:
    """``body`` with 3-6 padding sentences from the template groups, in varied positions."""
    parts = sentences(body)
    is_prose = "\n" not in body.strip()  # single-paragraph bodies get padding between sentences too
    opening: list[str] = []
    closing: list[str] = []
    inside: list[tuple[int, str]] = []  # (insert before sentence index, text) for prose bodies
    groups = ["restate", "hedge", "filler", "repeat", "close"]
    chosen_groups = rng.sample(groups, rng.randint(3, 5))
    if rng.random() < 0.5:
        chosen_groups.append(rng.choice(["hedge", "filler"]))
    for group in chosen_groups:
        if group == "restate":
            opening.append(rng.choice(RESTATE).format(q=short_question(prompt)))
        elif group == "hedge":
            text = rng.choice(HEDGE)
            where = rng.choice(["open", "inside"] if is_prose and len(parts) > 1 else ["open"])
            (opening.append(text) if where == "open" else inside.append((rng.randint(1, len(parts) - 1), text)))
        elif group == "filler":
            text = rng.choice(FILLER)
            where = rng.choice(["open", "inside", "close"] if is_prose and len(parts) > 1 else ["open", "close"])
            if where == "open":
                opening.append(text)
            elif where == "close":
                closing.append(text)
            else:
                inside.append((rng.randint(1, len(parts) - 1), text))
        elif group == "repeat":
            said = rng.choice(parts[: max(1, min(3, len(parts)))])
            text = rng.choice(REPEAT).format(s=lower_first(said))
            if is_prose and len(parts) > 1 and rng.random() < 0.5:
                inside.append((rng.randint(1, len(parts) - 1), text))
            else:
                closing.insert(0, text)
        else:
            closing.append(rng.choice(CLOSE))
    rng.shuffle(opening)
    if is_prose:
        merged = list(parts)
        for index, text in sorted(inside, key=lambda item: -item[0]):
            merged.insert(index, text)
        middle = " ".join(merged)
    else:
        middle = body.strip()
    pieces = [" ".join(opening), middle, " ".join(closing)]
    return "\n\n".join(piece for piece in pieces if piece)


def pad_refusal(prompt: str, refusal: str, rng: random.Random) -> str:
    """``refusal`` padded with 3-6 refusal-shaped sentences (acknowledge, explain, repeat, close)."""
    opening = [rng.choice(REFUSAL_OPEN).format(q=short_question(prompt))] if rng.random() < 0.7 else []
    explain = rng.sample(REFUSAL_EXPLAIN, rng.randint(1, 3))
    closing = [rng.choice(REFUSAL_CLOSE)]
    if rng.random() < 0.5:
        closing.insert(0, rng.choice(REFUSAL_REPEAT).format(s=lower_first(refusal)))
    while len(opening) + len(explain) + len(closing) < 3:
        explain.append(rng.choice([text for text in REFUSAL_EXPLAIN if text not in explain]))
    if rng.random() < 0.5:  # the refusal itself first, or after the explanations
        body = [refusal] + explain
    else:
        body = explain + [refusal]
    return "\n\n".join(" ".join(part) for part in (opening, body, closing) if part)


def refusal_pairs(prompts: list[dict], count: int, seed: int) -> list[dict]:
    """``count`` concise refusals on harmful training prompts: short refusal vs the same refusal padded."""
    from lora_arith.training.data import REFUSALS

    picked = random.Random(f"{seed}:refusals").sample(prompts, min(count, len(prompts)))
    pairs = []
    for row in picked:
        rng = random.Random(f"{seed}:{row['id']}")
        refusal = rng.choice(REFUSALS)
        rejected = pad_refusal(row["prompt"], refusal, rng)
        pairs.append({"prompt": row["prompt"], "chosen": refusal, "rejected": rejected, "id": f"concise-refusal-{row['id']}"})
    return pairs


def make_pairs(rows: list[dict], seed: int) -> list[dict]:
    pairs = []
    for row in rows:
        prompt, answer = row["prompt"], row["response"].strip()
        if words(answer) <= SHORT_WORDS:
            chosen, long_answer = answer, answer
        else:
            lead = concise_lead(answer)
            if lead is None:
                continue
            chosen, long_answer = lead, answer
        rng = random.Random(f"{seed}:{row['id']}")
        rejected = pad(prompt, long_answer, rng)
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "id": f"concise-{row['id']}"})
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="../shared/data", help="the shared data folder")
    parser.add_argument("-o", "--output", default="examples/data/concise_pairs.jsonl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--refusal-pairs", type=int, default=0, metavar="N",
                        help="also write N concise refusals on harmful training prompts (default 0)")
    parser.add_argument("-f", "--force", action="store_true", help="overwrite the output")
    args = parser.parse_args(argv)
    source = Path(args.data) / "helpful" / "alpaca_demo.jsonl"
    lines = source.read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines[:-HELD_OUT] if line.strip()]
    pairs = make_pairs(rows, args.seed)
    harmful: list[dict] = []
    if args.refusal_pairs:
        for name in REFUSAL_SOURCES:
            text = (Path(args.data) / "harmless" / name).read_text(encoding="utf-8")
            harmful.extend(json.loads(line) for line in text.splitlines() if line.strip())
        pairs += refusal_pairs(harmful, args.refusal_pairs, args.seed)
        random.Random(f"{args.seed}:order").shuffle(pairs)
    out = Path(args.output)
    if out.exists() and not args.force:
        print(f"Error: {out} exists; use --force to overwrite", file=sys.stderr)
        return 1
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(pair, ensure_ascii=False) + "\n" for pair in pairs), encoding="utf-8")
    tmp.replace(out)
    extra = f" and {args.refusal_pairs} concise refusals on {len(harmful)} harmful prompts" if harmful else ""
    print(f"{len(pairs)} pairs from the first {len(rows)} rows of {source.name}{extra} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
