"""Benchmark ``lora-arith merge`` (streaming, shard by shard) against PEFT's ``merge_and_unload`` + ``save_pretrained``.

Workload: a synthetic Llama-shaped base (hidden 4096, intermediate 14336, 32 query and 8 KV heads,
vocabulary 32000, ``--layers`` decoder layers, default 6: about 3.1 GB in bf16), written as
``--shards``-style safetensors shards of at most ``--max-shard-mb`` (default 900 MB: 4 shards)
with an index, and two random rank-16 adapters (all seven projections, ``lora_alpha`` 32, bf16).

Both sides merge ``1·A + 1·B`` into the bf16 base and write a bf16 model folder:

* lora-arith: ``lora_arith.model.merge.merge_adapters`` (what ``lora-arith merge`` runs);
* PEFT: ``AutoModelForCausalLM.from_pretrained(dtype=bfloat16)``, ``PeftModel.from_pretrained`` +
  ``load_adapter``, ``merge_and_unload(adapter_names=[both])``, ``save_pretrained``.

Each side runs in its own fresh Python process (this script re-invokes itself with a hidden
``--worker``): wall time is the whole process, measured by this stdlib-only parent, and peak RSS
is the worker's own ``VmHWM``. Then a third process compares the two outputs tensor by tensor.

The targets (exit status 0 when all hold): lora-arith's peak RSS ≤ 1.5× the largest shard and
≤ 1/4 of PEFT's, and its wall time no worse than PEFT's. The multi-GB files live in a temporary
folder that is removed at the end (``--workdir`` keeps the generated base and adapters for reruns;
outputs are always removed).

Usage::

    python benchmarks/bench_merge.py                 # ~3 GB base, 4 shards (a few minutes)
    python benchmarks/bench_merge.py --layers 1      # quick sanity run (~0.9 GB)
    python benchmarks/bench_merge.py --out merge.json
"""

from __future__ import annotations

# Only the standard library at module level, as in harness and synthetic (see harness.py: ru_maxrss inheritance).
import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

from harness import (
    Json,
    add_worker_arguments,
    disk_bytes,
    log,
    peak_rss_bytes,
    run_worker_if_asked,
    thread_env,
    timed,
    work_folder,
)
from harness import run_worker as run_script_worker
from synthetic import LLAMA3_8B, Shapes, read_peft_dir, write_adapters, write_sharded_base

GB = 1e9


# -- workers (each in its own process) ----------------------------------------------------------


def worker_generate(params: Json) -> Json:
    """Write the sharded bf16 base (config, index, shards of at most ``max_shard_bytes``) and two adapters."""
    shapes, layers = Shapes(**params["shapes"]), params["layers"]
    sizes = write_sharded_base(shapes, layers, Path(params["base"]), params["max_shard_bytes"])
    write_adapters(shapes, layers, params["rank"], params["adapters"])
    return {"shard_bytes": sizes, "total_bytes": sum(sizes)}


def worker_ours(params: Json) -> Json:
    """``lora_arith.model.merge.merge_adapters`` on the base and the two adapters (weights 1 and 1)."""
    import lora_arith
    from lora_arith.model.merge import merge_adapters
    from lora_arith.lora.specs import parse_specs

    start = time.perf_counter()
    merge_adapters(params["base"], parse_specs(params["adapters"]), params["output"])
    return {"merge_s": time.perf_counter() - start, "peak_rss_bytes": peak_rss_bytes(), "lora_arith": lora_arith.__file__}


def worker_peft(params: Json) -> Json:
    """PEFT: load the bf16 base, attach both adapters, ``merge_and_unload`` both, ``save_pretrained``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(params["base"], dtype=torch.bfloat16)
    names = [f"a{i}" for i in range(len(params["adapters"]))]
    model = PeftModel.from_pretrained(model, params["adapters"][0], adapter_name=names[0])
    for name, path in zip(names[1:], params["adapters"][1:]):
        model.load_adapter(path, adapter_name=name)
    loaded = time.perf_counter()
    merged = model.merge_and_unload(adapter_names=names)
    merged_at = time.perf_counter()
    merged.save_pretrained(params["output"])
    end = time.perf_counter()
    return {"load_s": loaded - start, "merge_s": merged_at - loaded, "save_s": end - merged_at,
            "total_s": end - start, "peak_rss_bytes": peak_rss_bytes()}


def _tensor_files(folder: Path) -> dict[str, Path]:
    from safetensors import safe_open

    files = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            files.update({key: path for key in handle.keys()})  # noqa: SIM118
    return files


def worker_compare(params: Json) -> Json:
    """Compare both outputs with the exact merge ``W + Σ BᵢAᵢ`` (fp64 from the base and the factors, read
    by synthetic's independent reader), in bf16 units in the last place (ulps)."""
    import torch
    from safetensors import safe_open

    files = {key: _tensor_files(Path(params[key])) for key in ("ours", "peft", "base")}
    factors = [read_peft_dir(Path(path)) for path in params["adapters"]]
    report: Json = {"tensors": len(files["ours"]), "same_keys": sorted(files["ours"]) == sorted(files["peft"]),
                    "dtypes": set(), "merged": 0, "max_ulps": {"ours": 0.0, "peft": 0.0},
                    "identical_unmerged": True}
    for key, path in files["ours"].items():
        values = {}
        for side in ("ours", "peft", "base"):
            with safe_open(files[side][key] if side != "ours" else path, framework="pt") as handle:
                values[side] = handle.get_tensor(key)
        report["dtypes"].add(str(values["ours"].dtype))
        module = key.removesuffix(".weight")
        if module not in factors[0]:
            same = torch.equal(values["ours"], values["base"]) and torch.equal(values["peft"], values["base"])
            report["identical_unmerged"] &= same
            continue
        report["merged"] += 1
        exact = values["base"].double()
        scale = exact.abs()
        for adapter in factors:
            B, A = adapter[module]
            delta = B.double() @ A.double()
            exact += delta
            scale += delta.abs()
        # ulps of |W| + Σ|ΔWᵢ| (the operands' scale): where the terms cancel, the attainable accuracy
        # is set by the operands, not by the (tiny) result.
        _, exponent = torch.frexp(scale)
        ulp = torch.ldexp(torch.ones_like(exact), exponent - 8)
        for side in ("ours", "peft"):
            error = float(((values[side].double() - exact).abs() / ulp).max())
            report["max_ulps"][side] = max(report["max_ulps"][side], error)
    report["dtypes"] = sorted(report["dtypes"])
    return report


WORKERS: dict[str, Callable[[Json], Json]] = {
    "generate": worker_generate,
    "ours": worker_ours,
    "peft": worker_peft,
    "compare": worker_compare,
}


# -- orchestration (stdlib only) -----------------------------------------------------------------


def run_worker(name: str, params: Json, threads: int | None) -> Json:
    """Run a worker of this script in a fresh process (:func:`harness.run_worker`, with this checkout's
    lora_arith first on the path); add its whole-process wall time."""
    wall, result = timed(lambda: run_script_worker(__file__, name, params, thread_env(threads)))
    result["process_wall_s"] = wall
    return result


def run_benchmark(args: argparse.Namespace, workdir: Path) -> Json:
    base, adapters = workdir / "base", [str(workdir / f"adapter{i}") for i in range(2)]
    if not (base / "model.safetensors.index.json").is_file():
        log(f"writing a {args.layers}-layer Llama-shaped bf16 base in shards of ≤ {args.max_shard_mb} MB and 2 adapters")
        generated = run_worker("generate", {"shapes": asdict(LLAMA3_8B), "layers": args.layers, "base": str(base),
                                            "adapters": adapters, "rank": args.rank,
                                            "max_shard_bytes": args.max_shard_mb * 10**6}, args.threads)
        log(f"  {generated['total_bytes'] / GB:.2f} GB in {len(generated['shard_bytes'])} shards, "
            f"{generated['process_wall_s']:.1f} s")
    shards = sorted(base.glob("*.safetensors"))
    shard_bytes = [p.stat().st_size for p in shards]
    results: Json = {"layers": args.layers, "rank": args.rank, "shards": len(shards), "shard_bytes": shard_bytes,
                     "base_bytes": sum(shard_bytes), "threads": args.threads, "cpus": os.cpu_count()}
    outputs = {side: workdir / f"out-{side}" for side in ("ours", "peft")}
    try:
        for side in ("ours", "peft"):
            shutil.rmtree(outputs[side], ignore_errors=True)
            log(f"[{side}] merging")
            results[side] = run_worker(side, {"base": str(base), "adapters": adapters, "output": str(outputs[side])},
                                       args.threads)
            results[side]["output_bytes"] = disk_bytes(outputs[side])
            log(f"  wall {results[side]['process_wall_s']:.1f} s, peak RSS {results[side]['peak_rss_bytes'] / GB:.2f} GB")
        log("comparing the outputs")
        results["compare"] = run_worker("compare", {"ours": str(outputs["ours"]), "peft": str(outputs["peft"]),
                                                    "base": str(base), "adapters": adapters}, args.threads)
    finally:
        for output in outputs.values():
            shutil.rmtree(output, ignore_errors=True)
    return results


def checks(results: Json) -> list[Json]:
    ours, peft, largest = results["ours"], results["peft"], max(results["shard_bytes"])
    return [
        {"name": "our peak RSS ≤ 1.5× the largest shard", "ok": ours["peak_rss_bytes"] <= 1.5 * largest,
         "value": f"{ours['peak_rss_bytes'] / largest:.2f}×"},
        {"name": "our peak RSS ≤ 1/4 of PEFT's", "ok": 4 * ours["peak_rss_bytes"] <= peft["peak_rss_bytes"],
         "value": f"1/{peft['peak_rss_bytes'] / ours['peak_rss_bytes']:.1f}"},
        {"name": "our wall time ≤ PEFT's", "ok": ours["process_wall_s"] <= peft["process_wall_s"],
         "value": f"{peft['process_wall_s'] / ours['process_wall_s']:.2f}× faster"},
        {"name": "same tensors; merged weights within 0.51 bf16 ulp of the exact merge (correctly rounded)",
         "ok": results["compare"]["same_keys"] and results["compare"]["identical_unmerged"]
         and results["compare"]["max_ulps"]["ours"] <= 0.51,
         "value": f"{results['compare']['max_ulps']['ours']:.2f} ulp (PEFT {results['compare']['max_ulps']['peft']:.2f} ulp)"},
    ]


def report(results: Json) -> str:
    ours, peft, compare = results["ours"], results["peft"], results["compare"]
    largest = max(results["shard_bytes"])
    lines = [
        f"base: {results['layers']} layers, {results['base_bytes'] / GB:.2f} GB bf16 in {results['shards']} shards "
        f"(largest {largest / GB:.2f} GB); two rank-{results['rank']} adapters, weights 1 and 1",
        "",
        "| merge | wall time (whole process) | peak RSS | peak RSS / largest shard |",
        "|---|---|---|---|",
        f"| lora-arith `merge` (streaming) | {ours['process_wall_s']:.1f} s | {ours['peak_rss_bytes'] / GB:.2f} GB | "
        f"{ours['peak_rss_bytes'] / largest:.2f}× |",
        f"| PEFT `merge_and_unload` + `save_pretrained` | {peft['process_wall_s']:.1f} s | "
        f"{peft['peak_rss_bytes'] / GB:.2f} GB | {peft['peak_rss_bytes'] / largest:.2f}× |",
        f"| ratio PEFT / lora-arith | {peft['process_wall_s'] / ours['process_wall_s']:.2f}× | "
        f"{peft['peak_rss_bytes'] / ours['peak_rss_bytes']:.1f}× | |",
        "",
        f"- PEFT phases: load {peft['load_s']:.1f} s, merge {peft['merge_s']:.1f} s, save {peft['save_s']:.1f} s; "
        f"lora-arith merge call {ours['merge_s']:.1f} s (lora_arith from {Path(ours['lora_arith']).parent.parent})",
        f"- outputs: {compare['tensors']} tensors ({compare['merged']} merged), dtypes {compare['dtypes']}; largest "
        f"error against the exact merge (fp64): lora-arith {compare['max_ulps']['ours']:.2f} bf16 ulp, PEFT "
        f"{compare['max_ulps']['peft']:.2f} ulp; other tensors byte-identical to the base: {compare['identical_unmerged']}",
        f"- {results['cpus']} CPUs, threads {results['threads'] or 'default'}, 1-min load average "
        f"{ours['load_average_before'][0] if ours['load_average_before'] else '?'}–"
        f"{peft['load_average_after'][0] if peft['load_average_after'] else '?'}",
    ]
    lines += [f"- [{'PASS' if c['ok'] else 'FAIL'}] {c['name']}: {c['value']}" for c in results["checks"]]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=6, help="decoder layers of the base (default 6: ~3.1 GB bf16)")
    parser.add_argument("--max-shard-mb", type=int, default=900, help="largest shard in MB (default 900: 4 shards)")
    parser.add_argument("--rank", type=int, default=16, help="rank of both adapters (default 16)")
    parser.add_argument("--threads", type=int, default=None, help="OMP/MKL threads of every worker (default: library's)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the generated base and adapters here")
    parser.add_argument("--out", type=Path, default=None, help="also write every number as JSON to this file")
    add_worker_arguments(parser, WORKERS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if run_worker_if_asked(WORKERS, args):
        return 0
    with work_folder(args.workdir, "bench-merge-") as workdir:
        results = run_benchmark(args, workdir)
    results["checks"] = checks(results)
    print(report(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(check["ok"] for check in results["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
