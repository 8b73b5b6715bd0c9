#!/usr/bin/env bash
# Evaluate the shipped preference vectors on the default base (the README's table and heatmaps).
#
#   bash examples/evaluate_preference_vectors.sh [CONFIG...]     # from the repository root
#
# CONFIG is any of: base helpful harmless both baseline sweep (default: all). Results go to
# examples/results/<config>/ (results.json, summary.md, completions.jsonl) and
# examples/results/sweep/ (sweep.csv, sweep.json, heatmap_*.png).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${DATA:-../shared/data}"
RESULTS="${RESULTS:-examples/results}"
export HF_HUB_OFFLINE=1
mkdir -p "$RESULTS"

PROMPTS=(--prompts "$DATA/eval/xstest_prompts.jsonl")
PAIRS=(--pairs "$DATA/eval/xstest_safe_pairs.jsonl" --pairs "$DATA/eval/xstest_unsafe_pairs.jsonl" --max-pairs 50)
GENERATION=(--max-new-tokens 40 --batch-size 16)

evaluate() {  # NAME [--adapter SPEC]...
  local name=$1; shift
  lora-arith eval "$@" "${PROMPTS[@]}" "${PAIRS[@]}" "${GENERATION[@]}" -o "$RESULTS/$name" --force
}

for config in "${@:-base helpful harmless both baseline sweep}"; do
  for item in $config; do
    case $item in
      base)     evaluate base ;;
      helpful)  evaluate helpful --adapter adapters/helpful.safetensors ;;
      harmless) evaluate harmless --adapter adapters/harmless.safetensors ;;
      both)     evaluate both --adapter adapters/helpful.safetensors:1 --adapter adapters/harmless.safetensors:1 ;;
      baseline) evaluate baseline --adapter adapters/baseline-union.safetensors ;;
      sweep)    lora-arith sweep --vector helpful=adapters/helpful.safetensors \
                  --vector harmless=adapters/harmless.safetensors --grid=-1,-0.5,0,0.5,1 \
                  "${PROMPTS[@]}" --limit 30 --max-new-tokens 24 --batch-size 20 -o "$RESULTS/sweep" --force ;;
      *) echo "unknown config $item" >&2; exit 2 ;;
    esac
  done
done
