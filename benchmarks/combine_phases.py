"""CPU time of each phase of a cold ``combine`` (imports, ``combine()``, ``save``), each run in a fresh process.

Used to find where the whole-process time of ``lora-arith combine`` goes beyond reading, and to
compare two versions of the code on the same inputs. CPU time (``time.process_time``) is used because
wall time is unreliable on a shared machine.

Usage (inputs from ``bench_combine.py --workdir DIR``, which keeps ``DIR/full-adapter0`` and ``1``)::

    python benchmarks/bench_combine.py --skip-peft --repeats 1 --workdir /tmp/bc
    python benchmarks/combine_phases.py /tmp/bc/full-adapter0 /tmp/bc/full-adapter1
    # the same for an older commit, unpacked beside the current one:
    git archive c7ff772 lora_arith | tar -x -C /tmp/old
    python benchmarks/combine_phases.py /tmp/bc/full-adapter0 /tmp/bc/full-adapter1 --code /tmp/old
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

PHASES = """
import sys, time
start = time.process_time()
import lora_arith.cli.adapter_commands
from lora_arith.lora.combine import combine
from lora_arith.lora.specs import parse_specs
imported = time.process_time()
method, output, inputs = sys.argv[1], sys.argv[2], sys.argv[3:]
result = combine(parse_specs([f"{path}:1" for path in inputs]), method=method, rank=16 if method == "svd" else None)
combined = time.process_time()
result.save(output, force=True)
saved = time.process_time()
print(f"{method}: imports {imported - start:.2f} s, combine() {combined - imported:.2f} s, save {saved - combined:.2f} s "
      f"(CPU; lora_arith from {lora_arith.__file__.rsplit('/', 2)[0]})")
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs=2, help="the two adapter folders")
    parser.add_argument("--code", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="folder holding the lora_arith package to measure (default: this checkout)")
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes per method (default 2)")
    parser.add_argument("--output", type=Path, default=Path("/tmp/combine-phases-out"), help="scratch output")
    args = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=str(args.code.resolve()), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    for _ in range(args.repeats):
        for method in ("cat", "svd"):
            # cwd "/": `python -c` puts the working directory first on sys.path, ahead of PYTHONPATH
            subprocess.run([sys.executable, "-c", PHASES, method, str(args.output), *map(os.path.abspath, args.inputs)],
                           env=env, check=True, cwd="/")
    subprocess.run(["rm", "-rf", str(args.output)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
