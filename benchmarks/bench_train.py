"""Benchmark a DPO step: lora-arith's ``train`` (with and without ``--precompute-ref``) against raw
TRL (``DPOTrainer`` with the same settings, none of lora-arith's code around it), side by side
in one process.

Workload: the default base (SmolLM2-135M-Instruct, fp32, no 4-bit, no bf16 autocast: CPU, fp32),
LoRA r 8 / alpha 16 on all linear layers, DPO β 0.1, batch ``--batch-size`` × ``--grad-accum``,
``--max-length`` tokens, ``--steps`` optimizer steps on the first pairs of
``../shared/data/helpful/xstest_safe_pairs.jsonl``.

* ``raw TRL``: ``AutoModelForCausalLM`` + ``DPOTrainer(peft_config=LoraConfig(...))`` on the same
  conversational rows, built here from the JSON lines (the base's files are only located with
  lora-arith's ``resolve_base``);
* ``lora-arith``: :func:`lora_arith.training.train.train_preference` (writes the adapter folder too);
* ``lora-arith --precompute-ref``: the same with TRL's precomputed reference log-probs (their
  one pass over the pairs happens before the first step and is reported as set-up time).

Step time is the median time between transformers' ``on_step_begin`` and ``on_step_end`` of
every step but the first (a callback added to each trainer; lora-arith's trainer is reached by
wrapping ``lora_arith.training.train._make_trainer`` here, the package is not changed). The three runs
repeat ``--repeats`` times in rotating order, so load from other jobs hits all alike; the table
gives the median over repeats, and the ratios to raw TRL.

Usage::

    python benchmarks/bench_train.py --steps 3 --repeats 1          # a quick check (minutes on 2 busy cores)
    python benchmarks/bench_train.py --base TINY_CHAT_MODEL --steps 3 --max-length 64   # the script itself, in seconds
    python benchmarks/bench_train.py --steps 20 --repeats 3 --threads 2 --out bench_train.json   # full size
    python benchmarks/bench_train.py --steps 6 --repeats 4 --threads 2 --skip-precompute   # the figure in docs/benchmarks.md

The step's wall time varies a lot between runs on a shared or small machine, so each step's CPU time
(``time.process_time``, all threads) is reported beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"


def step_timer():
    """A transformers callback recording each optimizer step's duration (seconds) in ``.steps``."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.steps: list[float] = []
            self.cpu_steps: list[float] = []  # the process's CPU time (all threads) per step
            self.setup: dict = {}
            self._start = self._cpu_start = 0.0

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 0 and model is not None:  # what the step runs, to compare the trainers
                import torch

                trainable = [p for p in model.parameters() if p.requires_grad]
                self.setup = {
                    "torch_threads": torch.get_num_threads(),
                    "attention": getattr(model.config, "_attn_implementation", None),
                    "trainable_parameters": sum(p.numel() for p in trainable),
                    "trainable_dtypes": sorted({str(p.dtype) for p in trainable}),
                    "activation_checkpointing": bool(
                        getattr(model, "is_activation_checkpointing", getattr(model, "is_gradient_checkpointing", False))
                    ),
                }
            self._start, self._cpu_start = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(time.perf_counter() - self._start)
            self.cpu_steps.append(time.process_time() - self._cpu_start)

    return StepTimer()


def settings(args: argparse.Namespace) -> dict:
    return dict(
        rank=8, alpha=16.0, beta=0.1, lr=5e-4, max_steps=args.steps, batch_size=args.batch_size,
        grad_accum=args.grad_accum, max_length=args.max_length, seed=0,
    )


def rows(path: Path, count: int) -> list[dict]:
    """The first ``count`` pairs of ``path`` in TRL's conversational preference form."""
    out = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            prompt = row["prompt"]
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            out.append({
                "prompt": messages,
                "chosen": [{"role": "assistant", "content": row["chosen"]}],
                "rejected": [{"role": "assistant", "content": row["rejected"]}],
            })
            if len(out) == count:
                break
    return out


def run_raw_trl(args: argparse.Namespace, data: list[dict], work: Path) -> dict:
    """Plain TRL: load the base, build DPOConfig/LoraConfig/DPOTrainer, train."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from lora_arith.model.base import resolve_base  # only to find the base's files on disk

    s = settings(args)
    # TRL turns activation checkpointing on by default; off, as lora-arith has it on CPU (the name
    # changed during transformers 5.x)
    names = {item.name for item in dataclasses.fields(DPOConfig)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    started = time.perf_counter()
    base = resolve_base(args.base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = DPOConfig(
        output_dir=str(work), beta=s["beta"], loss_type=["sigmoid"], learning_rate=s["lr"], max_steps=s["max_steps"],
        per_device_train_batch_size=s["batch_size"], gradient_accumulation_steps=s["grad_accum"],
        max_length=s["max_length"], lr_scheduler_type="cosine", warmup_steps=0.03, weight_decay=0.05, seed=s["seed"],
        logging_steps=1, disable_dropout=True, use_cpu=True, bf16=False, save_strategy="no", report_to="none",
        dataloader_pin_memory=False, **{checkpointing: False},
    )
    peft_config = LoraConfig(r=s["rank"], lora_alpha=s["alpha"], lora_dropout=0.0, target_modules="all-linear",
                             bias="none", task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(data), processing_class=tokenizer,
                         peft_config=peft_config)
    timer = step_timer()
    trainer.add_callback(timer)
    setup = time.perf_counter() - started
    trainer.train()
    return {"steps": timer.steps, "cpu_steps": timer.cpu_steps, "setup_s": setup, "wall_s": time.perf_counter() - started,
            "config": timer.setup}


def run_ours(args: argparse.Namespace, data_file: Path, work: Path, precompute: bool) -> dict:
    """lora-arith's train_preference on the same pairs, with a step timer added to its trainer."""
    import lora_arith.training.train as train

    timer = step_timer()
    original = train._make_trainer
    built = {}

    def instrumented(*a, **k):
        trainer = original(*a, **k)
        trainer.add_callback(timer)
        built["at"] = time.perf_counter()
        return trainer

    train._make_trainer = instrumented
    try:
        config = train.TrainConfig(data=[str(data_file)], base=args.base, quantize_4bit=False, bf16=False, device="cpu",
                                   gradient_checkpointing=False, precompute_ref=precompute, **settings(args))
        started = time.perf_counter()
        train.train_preference(config, work / "run")
    finally:
        train._make_trainer = original
    return {"steps": timer.steps, "cpu_steps": timer.cpu_steps, "setup_s": built["at"] - started,
            "wall_s": time.perf_counter() - started, "config": timer.setup}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA / "helpful" / "xstest_safe_pairs.jsonl")
    parser.add_argument("--base", help="Another base folder (default: the default base); e.g. a tiny one to try the script.")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="Also write the measurements as JSON here.")
    parser.add_argument("--skip-precompute", action="store_true", help="Only raw TRL and lora-arith (no --precompute-ref run).")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is warm-up)")

    import torch

    torch.set_num_threads(args.threads)
    data = rows(args.data, args.steps * args.batch_size * args.grad_accum)
    names = ["raw TRL", "lora-arith"] + ([] if args.skip_precompute else ["lora-arith --precompute-ref"])
    results: dict[str, list[dict]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        data_file = Path(tmp) / "pairs.jsonl"
        data_file.write_text("".join(json.dumps(row) + "\n" for row in data), encoding="utf-8")
        for repeat in range(args.repeats):
            order = names[repeat % len(names) :] + names[: repeat % len(names)]
            for name in order:
                work = Path(tempfile.mkdtemp(dir=tmp))
                if name == "raw TRL":
                    measured = run_raw_trl(args, data, work)
                else:
                    measured = run_ours(args, data_file, work, precompute=name.endswith("precompute-ref"))
                measured["step_s"] = statistics.median(measured["steps"][1:])
                measured["step_cpu_s"] = statistics.median(measured["cpu_steps"][1:])
                results[name].append(measured)
                print(f"repeat {repeat + 1} {name}: step {measured['step_s']:.3f} s (CPU {measured['step_cpu_s']:.3f} s), "
                      f"set-up {measured['setup_s']:.1f} s; runs with {measured['config']}", flush=True)

    summary = {name: {key: statistics.median(r[key] for r in runs) for key in ("step_s", "step_cpu_s", "setup_s", "wall_s")}
               for name, runs in results.items()}
    raw_cpu = summary["raw TRL"]["step_cpu_s"]
    raw = summary["raw TRL"]["step_s"]
    print(f"\n{args.steps} steps, batch {args.batch_size}x{args.grad_accum}, max length {args.max_length}, "
          f"{args.threads} thread(s), {args.repeats} repeat(s), medians")
    print("| run | step time (s) | vs raw TRL | step CPU time (s) | vs raw TRL | set-up (s) | wall (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, row in summary.items():
        print(f"| {name} | {row['step_s']:.3f} | {row['step_s'] / raw:.3f}x | {row['step_cpu_s']:.3f} | "
              f"{row['step_cpu_s'] / raw_cpu:.3f}x | {row['setup_s']:.1f} | {row['wall_s']:.1f} |")
    overhead = summary["lora-arith"]["step_s"] / raw - 1
    cpu_overhead = summary["lora-arith"]["step_cpu_s"] / raw_cpu - 1
    spread = {name: f"{min(r['step_s'] for r in runs):.2f}-{max(r['step_s'] for r in runs):.2f} s" for name, runs in results.items()}
    print(f"\nwrapper overhead on the step: {overhead:+.1%} wall, {cpu_overhead:+.1%} CPU (target <= +5%); "
          f"per-repeat step medians: {spread}")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": results,
                                        "summary": summary}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
