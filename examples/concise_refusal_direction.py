"""Issue 16 diagnostic: does the concise vector remove refusals by writing against a
"harmful vs ordinary" direction of the residual stream, and does projecting its writes off that
direction keep the refusals?

1. With helpful and harmless at (1, 1) and concise at 0, the last prompt token's residual stream is
   read at every layer for 64 harmful *training* prompts (AdvBench lines 1-64) and 64 ordinary
   training prompts (Alpaca lines 1-64; never the 200 held-out ones). Per layer, the direction is
   the difference of the two means, normalised.
2. On 64 other harmful training prompts (AdvBench lines 65-128), the mean projection on that
   direction is printed at concise 0 and 1: how far concise moves harmful prompts towards ordinary
   ones, against the gap between the two means.
3. The concise vector's residual writes (the ``B`` factors of ``o_proj`` and ``down_proj`` in layer
   l) are projected off the directions of layers l+1 … last (exact, on the factors), written to a
   temporary adapter, and step 2 is repeated with it.

Usage::

    python examples/concise_refusal_direction.py            # ~2 minutes on 2 CPU cores
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"
LAYERS = (5, 10, 15, 20, 25, 29)


def prompts(path: Path, start: int, stop: int) -> list[str]:
    lines = [json.loads(line) for line in path.open() if line.strip()]
    return [row["prompt"] for row in lines[start:stop]]


@torch.no_grad()
def last_token_states(mixer, texts: list[str]) -> torch.Tensor:
    """(prompts, layers + 1, hidden): the residual stream at each prompt's last token."""
    from lora_arith.model.generation import chat_prompt

    tokenizer = mixer.tokenizer
    tokenizer.padding_side = "left"
    rows = []
    for start in range(0, len(texts), 16):
        batch = [chat_prompt(tokenizer, text) for text in texts[start : start + 16]]
        encoded = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
        output = mixer.model(**encoded, output_hidden_states=True)
        rows.append(torch.stack([states[:, -1] for states in output.hidden_states], dim=1))
    return torch.cat(rows)


def projected_adapter(source: Path, directions: torch.Tensor, target: Path) -> float:
    """Write ``source`` with each layer's residual writes projected off the directions of the
    layers after it; returns the share of the written ``B`` factors' energy removed."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    target.mkdir(parents=True, exist_ok=True)
    (target / "adapter_config.json").write_bytes((source / "adapter_config.json").read_bytes())
    with safe_open(str(source / "adapter_model.safetensors"), "pt") as reader:
        metadata = reader.metadata()
        tensors = {key: reader.get_tensor(key) for key in reader.keys()}
    removed = total = 0.0
    last = directions.shape[0] - 1
    for key, factor in tensors.items():
        match = re.search(r"layers\.(\d+)\.(self_attn\.o_proj|mlp\.down_proj)\.lora_B", key)
        if not match or int(match.group(1)) + 1 >= last:
            continue
        basis, _ = torch.linalg.qr(directions[int(match.group(1)) + 1 : last].T.double())
        b = factor.double()
        kept = b - basis @ (basis.T @ b)
        removed += float((b - kept).pow(2).sum())
        total += float(b.pow(2).sum())
        tensors[key] = kept.to(factor.dtype).contiguous()
    save_file(tensors, str(target / "adapter_model.safetensors"), metadata=metadata)
    return removed / total


def main() -> None:
    from lora_arith.model.mixing import PreferenceMixer

    torch.set_num_threads(2)
    advbench, alpaca = DATA / "harmless" / "advbench_behaviors.jsonl", DATA / "helpful" / "alpaca_demo.jsonl"
    harmful, ordinary, check = prompts(advbench, 0, 64), prompts(alpaca, 0, 64), prompts(advbench, 64, 128)
    adapters = {name: str(REPO / "adapters" / name) for name in ("helpful", "harmless", "concise")}
    mixer = PreferenceMixer(None, adapters, device="cpu")
    mixer.set(helpful=1, harmless=1, concise=0)
    harmful_states, ordinary_states = last_token_states(mixer, harmful), last_token_states(mixer, ordinary)
    difference = harmful_states.mean(0) - ordinary_states.mean(0)
    directions = difference / difference.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    gap = [(float(difference[layer].norm())) for layer in LAYERS]

    def projections(model_mixer) -> list[list[float]]:
        rows = []
        for eta in (0.0, 1.0):
            model_mixer.set(helpful=1, harmless=1, concise=eta)
            states = last_token_states(model_mixer, check)
            rows.append([float((states[:, layer] @ directions[layer]).mean()) for layer in LAYERS])
        return rows

    shipped = projections(mixer)
    with tempfile.TemporaryDirectory() as folder:
        share = projected_adapter(REPO / "adapters" / "concise", directions, Path(folder) / "concise")
        projected = projections(PreferenceMixer(None, {**adapters, "concise": str(Path(folder) / "concise")}))
    print("Mean projection of 64 held-out harmful training prompts on the harmful-minus-ordinary direction")
    print("(helpful, harmless at 1, 1); the gap is the distance between the harmful and ordinary means.\n")
    print("| layer | gap | concise 0 | concise 1 (shipped) | concise 1 (writes projected off) |")
    print("| --- | --- | --- | --- | --- |")
    for column, layer in enumerate(LAYERS):
        print(
            f"| {layer} | {gap[column]:.1f} | {shipped[0][column]:.1f} | {shipped[1][column]:.1f} | "
            f"{projected[1][column]:.1f} |"
        )
    print(f"\nEnergy of the residual writes' B factors removed by the projection: {share:.1%}")


if __name__ == "__main__":
    main()
