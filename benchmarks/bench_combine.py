"""Benchmark ``lora-arith combine`` against PEFT's ``add_weighted_adapter``.

Workload: two random rank-16 LoRA adapters on Llama-3-8B-shaped modules (hidden 4096,
intermediate 14336, 32 query heads and 8 KV heads of head_dim 128; all seven projections
q, k, v, o, gate, up, down), stored in bf16 as PEFT adapter directories.

Part 1 (in process, ``--peft-layers`` layers, default 1): lora-arith ``svd`` (rank 16) vs PEFT
``combination_type="svd"`` and lora-arith ``cat`` vs PEFT ``combination_type="cat"`` on the
same factors. Reports the time of each call, the speed-up (PEFT / lora-arith), the largest
per-module relative difference between the two results, each result's relative error
against the exact dense sum (and, for ``svd``, the Eckart–Young optimum), and peak RSS.

Part 2 (whole process, ``--layers`` layers, default 32): the ``lora-arith combine`` CLI on the
full pair with ``--method svd --rank 16`` and with ``--method cat``: wall time and peak RSS of
the child process, plus a check of the written adapter against the exact sum.

Every measurement runs in its own subprocess (this script re-invokes itself with a hidden
``--worker NAME`` argument and reads one JSON line back), so one side's memory never pollutes
the other's. The parent process imports only the standard library: on Linux ``ru_maxrss`` of
a child inherits the high-water mark of the process it was spawned from, so a heavy parent
would inflate every child's figure. Workers report their own peak as ``VmHWM`` from
``/proc/self/status`` (reset at exec), and the CLI run is measured with
``getrusage(RUSAGE_CHILDREN)`` inside a small stdlib-only wrapper process.

Usage::

    python benchmarks/bench_combine.py                       # full default run (~5-8 min)
    python benchmarks/bench_combine.py --layers 2 --skip-peft  # quick sanity run
    python benchmarks/bench_combine.py --out results.json
"""

from __future__ import annotations

# Only the standard library at module level (harness and synthetic import only it too): see the module
# docstring (ru_maxrss inheritance).
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from harness import (
    GiB,
    Json,
    add_worker_arguments,
    current_rss_bytes,
    disk_bytes,
    git_commit,
    gib,
    load_average,
    log,
    markdown_table,
    ms,
    peak_rss_bytes,
    ratio,
    run_worker_if_asked,
    thread_env,
    timed,
    work_folder,
    worker_cli,
)
from harness import run_worker as run_script_worker
from synthetic import LLAMA3_8B, LORA_ALPHA, SEED, TINY, Shapes, read_peft_dir, write_adapters, write_peft_dir


# -- exact references (fp64, from the factors) -------------------------------------------------


def stacked(parts: Sequence[tuple[Any, Any]], weights: Sequence[float]) -> tuple[Any, Any]:
    """``(B, A)`` of ``Σ wᵢ BᵢAᵢ`` by concatenation, in fp64."""
    import torch

    B = torch.cat([B.double() * w for (B, _), w in zip(parts, weights)], dim=1)
    A = torch.cat([A.double() for _, A in parts], dim=0)
    return B, A


def frobenius_squared(B: Any, A: Any) -> float:
    """``‖B A‖_F²`` from the factors: ``Σ (BᵀB) ∘ (AAᵀ)`` in fp64."""
    B, A = B.double(), A.double()
    return float(((B.T @ B) * (A @ A.T)).sum())


def optimal_relative_error(B: Any, A: Any, rank: int | None) -> float:
    """The Eckart–Young optimum ``‖ΔW − ΔW_k‖_F / ‖ΔW‖_F`` for ``ΔW = B A`` (0 when ``rank`` is None)."""
    import torch

    if rank is None:
        return 0.0
    _, R_B = torch.linalg.qr(B.double())
    _, R_A = torch.linalg.qr(A.double().T)
    singular = torch.linalg.svdvals(R_B @ R_A.T)
    total = float(singular.square().sum())
    return math.sqrt(float(singular[rank:].square().sum()) / total) if total > 0 else 0.0


# -- workers (each runs in its own process) ----------------------------------------------------


def worker_generate(params: Json) -> Json:
    """Write the two input adapters (``params``: shapes, layers, rank, outputs)."""
    outputs = params["outputs"]
    modules = write_adapters(Shapes(**params["shapes"]), params["layers"], params["rank"], outputs)
    return {"adapters": [{"path": output, "modules": count, "bytes": disk_bytes(Path(output))}
                         for output, count in zip(outputs, modules)]}


def worker_ours(params: Json) -> Json:
    """Time ``lora_arith.lora.combine.combine`` (and ``Combination.save``) in process.

    The first call is reported as ``cold``; the ``repeats`` calls after it as ``warm`` (their
    median is the headline). The last result is also dumped in fp32 for the comparison.
    """
    import torch

    from lora_arith.lora.combine import combine
    from lora_arith.lora.specs import AdapterSpec

    specs = [AdapterSpec(path, 1.0) for path in params["inputs"]]
    method, rank = params["method"], params["rank"] if params["method"] == "svd" else None
    output = Path(params["output"])
    setup_rss = current_rss_bytes()

    runs = []
    for _ in range(1 + params["repeats"]):
        start = time.perf_counter()
        combination = combine(specs, method=method, rank=rank)
        combined = time.perf_counter()
        combination.save(output, force=True)
        saved = time.perf_counter()
        runs.append({"combine_s": combined - start, "save_s": saved - combined, "total_s": saved - start})
    peak = peak_rss_bytes()  # before the (untimed) fp32 dump below

    dump = {name: (delta.B.float(), delta.A.float()) for name, delta in combination.deltas.items()}
    out_rank = next(iter(dump.values()))[1].shape[0]
    write_peft_dir(Path(params["dump"]), dump, out_rank, out_rank, torch.float32)

    warm = runs[1:] or runs
    return {
        "cold": runs[0],
        "warm": warm,
        "combine_s": statistics.median(r["combine_s"] for r in warm),
        "combine_save_s": statistics.median(r["total_s"] for r in warm),
        "modules": len(combination.deltas),
        "output_rank": out_rank,
        "output_dtype": str(combination.dtype).removeprefix("torch."),
        "reported_max_relative_error": combination.max_relative_error,
        "setup_rss_bytes": setup_rss,
        "peak_rss_bytes": peak,
        "torch_threads": torch.get_num_threads(),
    }


def build_peft_skeleton(shapes: Shapes, layers: int) -> Any:
    """A ``LlamaForCausalLM`` with the real module shapes, ``layers`` layers and a tiny vocabulary.

    Built on the meta device and materialised with ``to_empty``: the fp32 base weights are
    allocated but never initialised or read (``add_weighted_adapter`` only touches LoRA
    weights), so their untouched pages barely count in RSS. fp32, not bf16, because PEFT gives
    a new ``cat`` adapter the base layer's dtype, which would round its result to bf16.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=shapes.hidden,
        intermediate_size=shapes.intermediate,
        num_attention_heads=shapes.heads,
        num_key_value_heads=shapes.kv_heads,
        head_dim=shapes.head_dim,
        num_hidden_layers=layers,
        vocab_size=128,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return model.to_empty(device="cpu").eval()


def peft_mix_factors(model: Any, adapter_name: str) -> dict[str, tuple[Any, Any]]:
    """``{module: (B·scaling, A)}`` of one adapter of a ``PeftModel``, in fp32."""
    factors = {}
    for name, module in model.base_model.model.named_modules():
        lora_A = getattr(module, "lora_A", None)
        if lora_A is not None and adapter_name in lora_A:
            B = module.lora_B[adapter_name].weight.detach().float() * module.scaling[adapter_name]
            factors[name] = (B, lora_A[adapter_name].weight.detach().float())
    return factors


def worker_peft(params: Json) -> Json:
    """Time PEFT's ``add_weighted_adapter`` on a skeleton model with the adapters loaded.

    Only the ``add_weighted_adapter`` call is timed (``repeats`` times, deleting the ``mix``
    adapter in between; the median is the headline). The result is dumped in fp32.
    """
    import peft
    import torch

    shapes = Shapes(**params["shapes"])
    inputs = params["inputs"]
    setup_s, model = timed(lambda: build_peft_skeleton(shapes, params["layers"]))
    names = [f"in{i}" for i in range(len(inputs))]
    load_s, model = timed(lambda: _load_peft_adapters(model, inputs, names))
    setup_rss, setup_peak = current_rss_bytes(), peak_rss_bytes()

    method = params["method"]
    kwargs: Json = {"combination_type": method}
    if method == "svd":
        kwargs.update(svd_rank=params["rank"], svd_full_matrices=params["full_matrices"])
    times = []
    for attempt in range(params["repeats"]):
        if attempt:
            model.delete_adapter("mix")
        seconds, _ = timed(
            lambda: model.add_weighted_adapter(adapters=names, weights=[1.0] * len(names), adapter_name="mix", **kwargs)
        )
        times.append(seconds)
        print(f"    PEFT {method}: add_weighted_adapter took {seconds:.2f} s", file=sys.stderr, flush=True)
    peak = peak_rss_bytes()

    mix = peft_mix_factors(model, "mix")
    out_rank = next(iter(mix.values()))[1].shape[0]
    write_peft_dir(Path(params["dump"]), mix, out_rank, out_rank, torch.float32)
    first = next(m for _, m in model.base_model.model.named_modules() if hasattr(m, "lora_A") and "mix" in m.lora_A)
    return {
        "times_s": times,
        "add_weighted_adapter_s": statistics.median(times),
        "kwargs": kwargs,
        "modules": len(mix),
        "output_rank": out_rank,
        "mix_dtype": str(first.lora_A["mix"].weight.dtype).removeprefix("torch."),
        "input_dtype": str(first.lora_A[names[0]].weight.dtype).removeprefix("torch."),
        "skeleton_build_s": setup_s,
        "adapter_load_s": load_s,
        "setup_rss_bytes": setup_rss,
        "setup_peak_rss_bytes": setup_peak,
        "peak_rss_bytes": peak,
        "peft_version": peft.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def _load_peft_adapters(base: Any, inputs: Sequence[str], names: Sequence[str]) -> Any:
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, inputs[0], adapter_name=names[0])
    for path, name in zip(inputs[1:], names[1:]):
        model.load_adapter(path, adapter_name=name)
    return model


def worker_compare(params: Json) -> Json:
    """Compare results module by module on the dense deltas (fp64).

    ``params``: ``inputs`` (PEFT dirs, weight 1 each), ``results`` ({label: PEFT dir}),
    ``pairs`` ([[label, label], …]) and ``rank`` (None for an exact method). Relative
    difference of a pair = ``‖ΔW_x − ΔW_y‖_F / ‖ΔW_exact‖_F``; relative error of a result =
    ``‖ΔW_x − ΔW_exact‖_F / ‖ΔW_exact‖_F``; both maxed over modules.
    """
    import torch

    inputs = [read_peft_dir(Path(p)) for p in params["inputs"]]
    results = {label: read_peft_dir(Path(p)) for label, p in params["results"].items()}
    rank = params["rank"]
    modules = sorted(inputs[0])
    for label, factors in results.items():
        if sorted(factors) != modules:
            raise RuntimeError(f"{label} has modules {sorted(factors)[:3]}… but the inputs have {modules[:3]}…")

    per_module = []
    for module in modules:
        B, A = stacked([f[module] for f in inputs], [1.0] * len(inputs))
        exact = B @ A
        norm = float(torch.linalg.matrix_norm(exact))
        dense = {label: f[module][0].double() @ f[module][1].double() for label, f in results.items()}
        row: Json = {
            "module": module,
            "shape": list(exact.shape),
            "optimal_error": optimal_relative_error(B, A, rank),
            "error": {label: float(torch.linalg.matrix_norm(d - exact)) / norm for label, d in dense.items()},
            "difference": {
                f"{x} vs {y}": float(torch.linalg.matrix_norm(dense[x] - dense[y])) / norm for x, y in params["pairs"]
            },
        }
        per_module.append(row)
        del exact, dense

    return {
        "max_optimal_error": max(r["optimal_error"] for r in per_module),
        "max_error": {label: max(r["error"][label] for r in per_module) for label in results},
        "max_excess_over_optimum": {
            label: max(r["error"][label] - r["optimal_error"] for r in per_module) for label in results
        },
        "max_difference": {key: max(r["difference"][key] for r in per_module) for key in per_module[0]["difference"]},
        "per_module": per_module,
    }


def worker_verify(params: Json) -> Json:
    """Check a written adapter against the exact sum from the factors alone (no dense matrices).

    Per module: relative error ``‖B_out A_out − Σ BᵢAᵢ‖_F / ‖Σ BᵢAᵢ‖_F`` and the Eckart–Young
    optimum for ``rank``; reports the largest error and the largest excess over the optimum.
    """
    inputs = [read_peft_dir(Path(p)) for p in params["inputs"]]
    output = read_peft_dir(Path(params["output"]))
    rank = params["rank"]
    missing = sorted(set(inputs[0]) - set(output))
    if missing:
        raise RuntimeError(f"the output lacks {len(missing)} modules, e.g. {missing[0]}")
    errors, excess, ranks = [], [], set()
    for module in sorted(inputs[0]):
        B, A = stacked([f[module] for f in inputs], [1.0] * len(inputs))
        B_out, A_out = output[module]
        ranks.add(A_out.shape[0])
        difference = stacked([(B, A), (B_out, A_out)], [1.0, -1.0])
        error = math.sqrt(max(frobenius_squared(*difference), 0.0) / frobenius_squared(B, A))
        errors.append(error)
        excess.append(error - optimal_relative_error(B, A, rank))
    return {
        "modules": len(errors),
        "output_ranks": sorted(ranks),
        "max_error": max(errors),
        "max_excess_over_optimum": max(excess),
    }


WORKERS: dict[str, Callable[[Json], Json]] = {
    "generate": worker_generate,
    "ours": worker_ours,
    "peft": worker_peft,
    "compare": worker_compare,
    "verify": worker_verify,
    "cli": worker_cli,
}


# -- orchestration (the parent process: standard library only) ---------------------------------


# Set by --threads: exported to every worker (and so to the lora-arith CLI child).
_worker_env: dict[str, str] = {}


def configure_threads(threads: int | None) -> None:
    """Pin the intra-op thread count of every worker and of the CLI child (None: library default)."""
    _worker_env.clear()
    _worker_env.update(thread_env(threads))


def run_worker(name: str, params: Json) -> Json:
    """Run a worker of this script in a fresh Python process (:func:`harness.run_worker`), with the
    thread variables of ``--threads``."""
    return run_script_worker(__file__, name, params, _worker_env)


def cli_command() -> list[str]:
    """``python -m lora_arith`` with this interpreter; :func:`run_worker` puts this checkout first on
    ``PYTHONPATH``, so the code measured is the code beside this script (a ``lora-arith`` on PATH
    may be another checkout's editable install, behind a pyenv shell shim)."""
    return [sys.executable, "-m", "lora_arith"]


READ_FLOOR = """
import sys
import torch
from safetensors import safe_open
for folder in sys.argv[1:]:
    with safe_open(folder + "/adapter_model.safetensors", framework="pt") as handle:
        for key in handle.keys():
            handle.get_tensor(key)
"""
"""The read floor: a process that only imports torch and safetensors and reads every input tensor."""

READ_FLOOR_FROZEN = READ_FLOOR + "import gc\ngc.freeze()\n"
"""The read floor with the garbage collector's heap frozen at the end, as the ``lora-arith`` CLI does at
exit (``lora_arith.cli._freeze_heap_at_exit``): the stricter reference, reported beside the floor."""


def generate_pair(workdir: Path, name: str, shapes: Shapes, layers: int, rank: int) -> list[str]:
    """Write the two input adapters for ``layers`` layers; return their paths."""
    outputs = [str(workdir / f"{name}-adapter{i}") for i in range(2)]
    seconds, result = timed(
        lambda: run_worker("generate", {"shapes": asdict(shapes), "layers": layers, "rank": rank, "outputs": outputs})
    )
    total = sum(a["bytes"] for a in result["adapters"])
    log(f"  wrote 2 adapters × {result['adapters'][0]['modules']} modules ({total / 2**20:.1f} MiB) in {seconds:.1f} s")
    return outputs


def in_process_comparison(args: argparse.Namespace, workdir: Path, shapes: Shapes, inputs: list[str], method: str) -> Json:
    """Part 1 for one method: lora-arith and (unless --skip-peft) PEFT on the same small pair."""
    rank = args.rank if method == "svd" else None
    log(f"[{method}] lora-arith in process ({args.peft_layers} layer(s))")
    ours = run_worker(
        "ours",
        {
            "inputs": inputs,
            "method": method,
            "rank": args.rank,
            "repeats": args.repeats,
            "output": str(workdir / f"ours-{method}-saved"),
            "dump": str(workdir / f"ours-{method}-fp32"),
        },
    )
    log(f"  combine {ours['combine_s'] * 1e3:.1f} ms (cold {ours['cold']['combine_s'] * 1e3:.1f} ms), "
        f"+save {ours['combine_save_s'] * 1e3:.1f} ms, peak RSS {ours['peak_rss_bytes'] / GiB:.2f} GiB")
    results = {"lora-arith": str(workdir / f"ours-{method}-fp32"), "lora-arith saved": str(workdir / f"ours-{method}-saved")}
    pairs = [["lora-arith", "lora-arith saved"]]
    peft = None
    if not args.skip_peft:
        log(f"[{method}] PEFT add_weighted_adapter ({args.peft_layers} layer(s)); svd takes minutes")
        peft = run_worker(
            "peft",
            {
                "shapes": asdict(shapes),
                "layers": args.peft_layers,
                "inputs": inputs,
                "method": method,
                "rank": args.rank,
                "repeats": 1 if method == "svd" else args.repeats,
                "full_matrices": not args.peft_reduced_svd,
                "dump": str(workdir / f"peft-{method}-fp32"),
            },
        )
        log(f"  add_weighted_adapter {peft['add_weighted_adapter_s']:.3f} s, peak RSS {peft['peak_rss_bytes'] / GiB:.2f} GiB")
        results["PEFT"] = str(workdir / f"peft-{method}-fp32")
        pairs.insert(0, ["PEFT", "lora-arith"])
    log(f"[{method}] comparing dense deltas")
    comparison = run_worker("compare", {"inputs": inputs, "results": results, "pairs": pairs, "rank": rank})
    return {"method": method, "rank": rank, "layers": args.peft_layers, "ours": ours, "peft": peft, "comparison": comparison}


def read_floor_run(inputs: list[str], frozen: bool = False) -> Json:
    """The read floor as a whole process (interpreter, torch and safetensors imports, every input tensor
    read); ``frozen``: with the heap frozen for the garbage collector at the end (:data:`READ_FLOOR_FROZEN`)."""
    log(f"[floor] a process that imports torch and safetensors and reads every input tensor{', GC frozen at exit' if frozen else ''}")
    floor = run_worker("cli", {"argv": [sys.executable, "-c", READ_FLOOR_FROZEN if frozen else READ_FLOOR, *inputs]})
    if floor["returncode"] != 0:
        raise RuntimeError(f"the read-floor process failed:\n{floor['stderr']}")
    log(f"  wall {floor['wall_s']:.2f} s, peak RSS {floor['peak_rss_bytes'] / GiB:.2f} GiB")
    return floor


def whole_process_run(args: argparse.Namespace, workdir: Path, inputs: list[str], method: str, verify: bool = True) -> Json:
    """Part 2 for one method: ``lora-arith combine`` as a whole process on the full pair, then (``verify``) a check."""
    output = workdir / f"cli-{method}-out"
    argv = cli_command() + ["combine", *(f"{p}:1" for p in inputs), "-o", str(output), "--method", method, "--force"]
    if method == "svd":
        argv += ["--rank", str(args.rank)]
    log(f"[{method}] lora-arith CLI, {args.layers} layers: {' '.join(argv[1:])}")
    cli = run_worker("cli", {"argv": argv})
    if cli["returncode"] != 0:
        raise RuntimeError(f"lora-arith failed:\n{cli['stderr']}")
    log(f"  wall {cli['wall_s']:.2f} s, peak RSS {cli['peak_rss_bytes'] / GiB:.2f} GiB")
    if not verify:
        return {"method": method, "layers": args.layers, "cli": cli}
    verify = run_worker("verify", {"inputs": inputs, "output": str(output), "rank": args.rank if method == "svd" else None})
    return {"method": method, "layers": args.layers, "cli": cli, "verify": verify, "output_bytes": disk_bytes(output)}


# -- reporting --------------------------------------------------------------------------------


def table_rows(results: Json) -> list[list[str]]:
    """One row per comparison: workload, lora-arith time, PEFT time, speed-up, max rel. diff, peak RSS."""
    rows = []
    for part in results["in_process"]:
        layers, method = part["layers"], part["method"]
        ours, peft, comparison = part["ours"], part["peft"], part["comparison"]
        what = f"svd → rank {part['rank']}" if method == "svd" else f"cat (exact, rank {ours['output_rank']})"
        workload = f"{layers} layer ({7 * layers} modules), {what}, in process"
        if peft:
            speedup = ratio(peft["add_weighted_adapter_s"] / ours["combine_s"])
            diff = f"{comparison['max_difference']['PEFT vs lora-arith']:.1e}"
            rss = f"{gib(ours['peak_rss_bytes'])} / {gib(peft['peak_rss_bytes'])}"
            peft_time = ms(peft["add_weighted_adapter_s"])
        else:
            speedup, diff, peft_time, rss = "—", "—", "skipped", gib(ours["peak_rss_bytes"])
        ours_time = f"{ms(ours['combine_s'])} ({ms(ours['combine_save_s'])} with save)"
        rows.append([workload, ours_time, peft_time, speedup, diff, rss])
    for part in results["whole_process"]:
        ranks = "/".join(str(r) for r in part["verify"]["output_ranks"])
        what = f"svd → rank {ranks}" if part["method"] == "svd" else f"cat (exact, rank {ranks})"
        workload = f"{part['layers']} layers ({part['verify']['modules']} modules), {what}, whole CLI process"
        excess = part["verify"]["max_excess_over_optimum"]
        note = f"{excess:.1e} over optimum (bf16 output)"
        rows.append([workload, ms(part["cli"]["wall_s"]), "—", "—", note, gib(part["cli"]["peak_rss_bytes"])])
    return rows


def floor_seconds(results: Json, key: str = "read_floor") -> float:
    """The median wall time of the read-floor runs (one before each round of CLI runs, one after)."""
    return statistics.median(run["wall_s"] for run in results[key])


def cpu_seconds(run: Json) -> float:
    """User + system CPU time of a whole-process run (steadier than wall time on a shared machine)."""
    return run["user_s"] + run["sys_s"]


def floor_table(results: Json) -> str:
    """The whole-process CLI runs beside the read floor, with their ratios (wall and CPU time)."""
    floor = floor_seconds(results)
    floor_cpu = statistics.median(cpu_seconds(run) for run in results["read_floor"])
    threads = f"OMP_NUM_THREADS={results['threads']}" if results["threads"] else "default threads"
    lines = [f"| whole process, {results['whole_process'][0]['layers']} layers ({threads}) | wall time | × read floor "
             "| CPU time (user+sys) | × read floor | peak RSS |",
             "|---|---|---|---|---|---|",
             f"| read floor: import torch + safetensors, read every input tensor | {ms(floor)} | 1.0× | {ms(floor_cpu)} "
             f"| 1.0× | {gib(max(run['peak_rss_bytes'] for run in results['read_floor']))} |"]
    for part in results["whole_process"]:
        what = "svd → rank 16" if part["method"] == "svd" else "cat (exact)"
        cli = part["cli"]
        lines.append(f"| `lora-arith combine --method {part['method']}` ({what}) | {ms(cli['wall_s'])} | "
                     f"{cli['wall_s'] / floor:.2f}× | {ms(cpu_seconds(cli))} | {cpu_seconds(cli) / floor_cpu:.2f}× | "
                     f"{gib(cli['peak_rss_bytes'])} |")
    if results.get("read_floor_frozen"):
        frozen = floor_seconds(results, "read_floor_frozen")
        walls = ", ".join(f"{part['method']} {part['cli']['wall_s'] / frozen:.2f}×" for part in results["whole_process"])
        lines.append(f"\nStricter reference: the read floor with the GC heap frozen at exit, as the CLI does: "
                     f"{ms(frozen)}; the CLI runs against it: {walls}.")
    runs = results.get("cli_repeats", 1)
    lines.append(f"\nWall times: medians of {runs} alternating rounds (floor, svd, cat, frozen floor), plus one floor run after.")
    return "\n".join(lines)


TABLE_HEADER = ["workload", "lora-arith time", "PEFT time", "speed-up", "max rel. diff", "peak RSS (lora-arith / PEFT)"]
"""The columns of :func:`table_rows`."""


def measured_loads(results: Json) -> list[float]:
    """The 1-minute load average before/after every measured worker."""
    parts = [p["ours"] for p in results["in_process"]] + [p["peft"] for p in results["in_process"] if p["peft"]]
    parts += [p["cli"] for p in results["whole_process"]] + results.get("read_floor", [])
    return [load[0] for part in parts for key in ("load_average_before", "load_average_after") if (load := part.get(key))]


def conditions(results: Json) -> str:
    """One line on the machine state: threads and the load other processes put on it."""
    environment = results["environment"]
    loads = measured_loads(results)
    threads = results["threads"] or f"default ({environment.get('torch_threads', '?')})"
    line = (f"lora-arith {environment.get('lora_arith_commit')}, torch {environment.get('torch')}, "
            f"peft {environment.get('peft')}, {environment.get('cpus')} CPUs, "
            f"intra-op threads {threads}, 1-min load average during measurements {min(loads):.1f}–{max(loads):.1f}")
    if loads and max(loads) > (environment.get("cpus") or 1) and results["threads"] != 1:
        line += (" — WARNING: the machine was busier than its CPU count; multi-threaded timings stall on"
                 " OpenMP barriers under such load (rerun with --threads 1 for stable numbers)")
    return line


def details(results: Json) -> list[str]:
    """Accuracy and target checks, one line each."""
    lines = [f"- {conditions(results)}"]
    for part in results["in_process"]:
        comparison, method = part["comparison"], part["method"]
        errors = ", ".join(f"{label} {value:.6f}" for label, value in comparison["max_error"].items())
        excess = ", ".join(f"{label} {value:+.1e}" for label, value in comparison["max_excess_over_optimum"].items())
        lines.append(f"- {method}, {part['layers']} layer: max rel. error vs exact sum: {errors}; "
                     f"optimum {comparison['max_optimal_error']:.6f}; excess over optimum: {excess}")
        for key, value in comparison["max_difference"].items():
            lines.append(f"  - max rel. difference {key}: {value:.2e}")
        if part["peft"]:
            ratio_cold = part["peft"]["add_weighted_adapter_s"] / part["ours"]["cold"]["combine_s"]
            ratio_save = part["peft"]["add_weighted_adapter_s"] / part["ours"]["combine_save_s"]
            lines.append(f"  - speed-up vs lora-arith cold first call: {ratio(ratio_cold)}; vs combine+save: {ratio(ratio_save)}")
    for check in results["checks"]:
        lines.append(f"- [{'PASS' if check['ok'] else 'FAIL'}] {check['name']}: {check['value']}")
    return lines


def checks(results: Json, args: argparse.Namespace) -> list[Json]:
    """The issue's targets: svd speed-up ≥ 500×, svd at the optimum, full run < 15 s and < 1.5 GB."""
    found = []
    for part in results["in_process"]:
        if part["method"] == "svd" and part["peft"] and not args.tiny:
            speedup = part["peft"]["add_weighted_adapter_s"] / part["ours"]["combine_s"]
            found.append({"name": "svd speed-up ≥ 500× (warm median)", "ok": speedup >= 500, "value": ratio(speedup)})
        excess = part["comparison"]["max_excess_over_optimum"]["lora-arith"]
        found.append({"name": f"{part['method']} lora-arith (fp32) at the optimum (excess ≤ 1e-5)", "ok": excess <= 1e-5,
                      "value": f"{excess:+.1e}"})
    if not args.tiny:
        floor = floor_seconds(results)
        for part in results["whole_process"]:
            wall, rss = part["cli"]["wall_s"], part["cli"]["peak_rss_bytes"]
            found.append({"name": f"{part['method']} whole process within 1.5× the read floor", "ok": wall <= 1.5 * floor,
                          "value": f"{wall / floor:.2f}× ({wall:.2f} s / {floor:.2f} s)"})
            if part["layers"] == 32:
                found.append({"name": f"{part['method']} 32 layers whole process < 15 s", "ok": wall < 15, "value": f"{wall:.2f} s"})
                found.append({"name": f"{part['method']} 32 layers peak RSS < 1.5 GB", "ok": rss < 1.5e9,
                              "value": f"{rss / 1e9:.2f} GB"})
    return found


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (``--worker``/``--worker-params`` are internal)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peft-layers", type=int, default=1, help="layers in the in-process comparison (default 1)")
    parser.add_argument("--skip-peft", action="store_true", help="run only the lora-arith parts")
    parser.add_argument("--layers", type=int, default=32, help="layers in the whole-process run (default 32)")
    parser.add_argument("--rank", type=int, default=16, help="input rank and svd output rank (default 16)")
    parser.add_argument("--repeats", type=int, default=3, help="warm repeats of the fast calls (default 3)")
    parser.add_argument("--cli-repeats", type=int, default=3,
                        help="rounds of whole-process runs (floor, svd, cat); medians are reported (default 3)")
    parser.add_argument("--peft-reduced-svd", action="store_true",
                        help="pass svd_full_matrices=False to PEFT (default: PEFT's default, True)")
    parser.add_argument("--threads", type=int, default=None,
                        help="set OMP_NUM_THREADS/MKL_NUM_THREADS for every measured process (default: library default)")
    parser.add_argument("--tiny", action="store_true", help="smoke test on small shapes (not Llama-3-8B)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep inputs and outputs here (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None, help="also write all results as JSON to this file")
    add_worker_arguments(parser, WORKERS)
    args = parser.parse_args(argv)
    for name in ("peft_layers", "layers", "rank", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.repeats < 0:
        parser.error("--repeats must be at least 0")
    return args


def environment() -> Json:
    """Versions and machine facts, read in a worker-free way (the parent stays stdlib-only)."""
    probe = ("import json,torch,peft,transformers,safetensors;"
             "print(json.dumps({'torch':torch.__version__,'peft':peft.__version__,"
             "'transformers':transformers.__version__,'safetensors':safetensors.__version__,"
             "'torch_threads':torch.get_num_threads()}))")
    completed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False,
                               env=dict(os.environ, HF_HUB_OFFLINE="1", **_worker_env))
    versions = json.loads(completed.stdout.strip().splitlines()[-1]) if completed.returncode == 0 else {}
    return {"python": sys.version.split()[0], "cpus": os.cpu_count(), "platform": sys.platform,
            "lora_arith_commit": git_commit(), **versions}


def run_benchmark(args: argparse.Namespace, workdir: Path) -> Json:
    """Both parts; returns everything that is reported."""
    shapes = TINY if args.tiny else LLAMA3_8B
    configure_threads(args.threads)
    results: Json = {"threads": args.threads, "load_average_start": load_average(), "shapes": asdict(shapes), "rank": args.rank, "lora_alpha": LORA_ALPHA, "seed": SEED,
                     "environment": environment(), "in_process": [], "whole_process": []}

    log(f"Part 1: {args.peft_layers} layer(s), in process{' (lora-arith only)' if args.skip_peft else ''}")
    small_inputs = generate_pair(workdir, "small", shapes, args.peft_layers, args.rank)
    for method in ("svd", "cat"):
        results["in_process"].append(in_process_comparison(args, workdir, shapes, small_inputs, method))

    log(f"Part 2: {args.layers} layers, whole lora-arith process")
    full_inputs = generate_pair(workdir, "full", shapes, args.layers, args.rank)
    # Rounds alternate the floor and the CLI runs, so load from other jobs hits all alike; the
    # reported CLI run of each method is its median-wall one (the first is also checked for accuracy).
    results["cli_repeats"] = args.cli_repeats
    results["read_floor"], results["read_floor_frozen"] = [], []
    cli_runs: dict[str, list[Json]] = {"svd": [], "cat": []}
    for repeat in range(args.cli_repeats):
        results["read_floor"].append(read_floor_run(full_inputs))
        for method in ("svd", "cat"):
            cli_runs[method].append(whole_process_run(args, workdir, full_inputs, method, verify=repeat == 0))
        results["read_floor_frozen"].append(read_floor_run(full_inputs, frozen=True))
    results["read_floor"].append(read_floor_run(full_inputs))  # again after, so both sides see the same page cache
    for method, runs in cli_runs.items():
        ordered = sorted(runs, key=lambda run: run["cli"]["wall_s"])
        part = dict(runs[0], cli=ordered[len(ordered) // 2]["cli"])
        part["cli_walls_s"] = [run["cli"]["wall_s"] for run in runs]
        results["whole_process"].append(part)

    results["load_average_end"] = load_average()
    results["checks"] = checks(results, args)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the Markdown table and the details, optionally write JSON."""
    args = parse_args(argv)
    if run_worker_if_asked(WORKERS, args):
        return 0

    with work_folder(args.workdir, "bench-combine-") as workdir:
        start = time.perf_counter()
        results = run_benchmark(args, workdir)
        results["benchmark_wall_s"] = time.perf_counter() - start

    print()
    print(markdown_table(TABLE_HEADER, table_rows(results)))
    print()
    print(floor_table(results))
    print()
    print("\n".join(details(results)))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0 if all(check["ok"] for check in results["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
