#!/usr/bin/env bash
# Reproduce the shipped preference vectors adapters/harmless/,
# adapters/helpful/ and adapters/concise/, and the mixed-data baseline adapters/baseline-union/
# (PEFT adapter folders) used in docs/results.md, on a CPU.
#
#   bash examples/train_preference_vectors.sh            # from the repository root
#
# Each preference is two DPO runs (on the pairs, then swapped) of 30 steps × 8 pairs on the
# 4-bit default base, 128 tokens, LoRA r 8 on all linear layers; then φ = Δ+ − Δ−.
# The two vectors train side by side, one core each; on this project's 2-vCPU machine a run
# took 10-14 minutes, both vectors 27 minutes and the baseline 25 more (see adapters/README.md for the full timing).
# Templated pairs (refusal: specs) are written from templates, not labelled by people.
# Left out on purpose (measured in adapters/README.md): the HH harmless pairs, whose chosen replies
# are mostly evasive rather than refusals, and answer-vs-refusal pairs templated on Alpaca, which
# most likely taught the model never to refuse (both were dropped at once).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${DATA:-../shared/data}"
OUT="${OUT:-adapters}"
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
mkdir -p "$OUT"

HARMLESS=(--data "$DATA/harmless/xstest_unsafe_pairs.jsonl"
          --data "refusal:$DATA/harmless/advbench_behaviors.jsonl"
          --data "refusal:$DATA/harmless/donotanswer_prompts.jsonl")
HELPFUL=(--data "$DATA/helpful/xstest_safe_pairs.jsonl"
         --data "$DATA/helpful/general_pairs.jsonl")
SETTINGS=(--max-steps 30 --batch-size 4 --grad-accum 2 --max-length 128 --lr 5e-4
          --rank 8 --alpha 16 --beta 0.1 --seed 0)
VECTOR=(--method svd --vector-rank 8 --dtype bf16 --force)

trap 'kill $(jobs -p) 2>/dev/null || true' EXIT   # stop the other run if one fails
lora-arith vector "${HARMLESS[@]}" "${SETTINGS[@]}" "${VECTOR[@]}" -o "$OUT/harmless" &
harmless=$!
lora-arith vector "${HELPFUL[@]}" "${SETTINGS[@]}" "${VECTOR[@]}" -o "$OUT/helpful" &
helpful=$!
wait "$harmless"
wait "$helpful"

# The baseline: one DPO adapter on the union of both data sets, as many pairs (2 × 240) as the
# two positive runs saw together.
RUNS="$(mktemp -d)"
lora-arith train "${HARMLESS[@]}" "${HELPFUL[@]}" "${SETTINGS[@]}" --max-steps 60 -o "$RUNS/baseline-union"
lora-arith combine "$RUNS/baseline-union/baseline-union.safetensors" --dtype bf16 -o "$OUT/baseline-union" --force

# The third vector, concise (docs/results.md: "Adding a preference"), added later without retraining the
# others. Its pairs are templated from Alpaca (examples/make_concise_pairs.py; the last 200 lines,
# the held-out ordinary prompts, are never used) and shipped as examples/data/concise_pairs.jsonl.
# It uses the same recipe as the two above (SETTINGS), on its own pairs. A second seed (--seed 1)
# gives the seed-stability cosine; both train side by side, one core each.
python examples/make_concise_pairs.py --data "$DATA" -o examples/data/concise_pairs.jsonl --force
CONCISE=(--data examples/data/concise_pairs.jsonl)
lora-arith vector "${CONCISE[@]}" "${SETTINGS[@]}" "${VECTOR[@]}" -o "$OUT/concise" &
concise=$!
lora-arith vector "${CONCISE[@]}" "${SETTINGS[@]}" --seed 1 "${VECTOR[@]}" -o "$RUNS/concise-seed1" &
concise_seed1=$!
wait "$concise"
wait "$concise_seed1"
lora-arith interference "$OUT/helpful" "$OUT/harmless" "$OUT/concise" "$RUNS/concise-seed1"
