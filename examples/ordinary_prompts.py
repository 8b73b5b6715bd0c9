"""Write the development set of *ordinary* prompts: requests that nothing should refuse.

They are the instructions of the last 200 lines of ``../shared/data/helpful/alpaca_demo.jsonl``,
which the data README holds out (no shipped vector trains on them; see adapters/README.md).
Each output line is ``{"prompt": ..., "kind": "ordinary", "id": ...}``, the form
``lora-arith eval``/``sweep``/``tune --prompts`` read; ``ordinary_compliance_rate`` is measured
on them.

Usage::

    python examples/ordinary_prompts.py -o ordinary.jsonl            # the last 200 instructions
    python examples/ordinary_prompts.py --count 100 -o ordinary.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "helpful" / "alpaca_demo.jsonl"
HELD_OUT = 200


def ordinary_rows(source: Path, count: int = HELD_OUT) -> list[dict]:
    """The last ``count`` (at most 200, the held-out part) instructions of ``source`` as ordinary prompts."""
    if not 0 < count <= HELD_OUT:
        raise SystemExit(f"--count must be between 1 and {HELD_OUT} (only the last {HELD_OUT} lines are held out)")
    lines = [line for line in source.read_text().splitlines() if line.strip()]
    rows = [json.loads(line) for line in lines[-HELD_OUT:]][:count]
    return [{"prompt": row["prompt"], "kind": "ordinary", "id": row.get("id")} for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--count", type=int, default=HELD_OUT)
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("-f", "--force", action="store_true")
    args = parser.parse_args()
    if args.output.exists() and not args.force:
        raise SystemExit(f"Error: {args.output} exists; pass --force to overwrite it")
    rows = ordinary_rows(args.source, args.count)
    temporary = args.output.with_name(f".{args.output.name}.tmp")
    temporary.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    temporary.replace(args.output)
    print(f"wrote {len(rows)} ordinary prompts to {args.output}")


if __name__ == "__main__":
    main()
