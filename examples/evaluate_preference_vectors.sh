#!/usr/bin/env bash
# Evaluate the shipped preference vectors on the default base (the table and heatmaps of docs/results.md).
#
#   bash examples/evaluate_preference_vectors.sh [CONFIG...]     # from the repository root
#
# CONFIG is any of: base helpful harmless both baseline sweep pairs (default: all but pairs).
# Results go to examples/results/<config>/ (results.json, summary.md, completions.jsonl),
# examples/results/sweep/ (sweep.csv, sweep.json, heatmap_*.png) and, for pairs,
# examples/results/pairs/<config>/ (the DPO metrics of every configuration per pair file).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${DATA:-../shared/data}"
RESULTS="${RESULTS:-examples/results}"
export HF_HUB_OFFLINE=1
mkdir -p "$RESULTS"

PROMPTS=(--prompts "$DATA/eval/xstest_prompts.jsonl")
PAIRS=(--pairs "$DATA/eval/xstest_safe_pairs.jsonl" --pairs "$DATA/eval/xstest_unsafe_pairs.jsonl" --max-pairs 50)
GENERATION=(--max-new-tokens 40 --batch-size 16)

CONFIGS="base helpful harmless both baseline"

adapters_of() {  # CONFIG: the --adapter options of one evaluated configuration
  case $1 in
    base)     ;;
    helpful)  echo --adapter adapters/helpful ;;
    harmless) echo --adapter adapters/harmless ;;
    both)     echo --adapter adapters/helpful:1 --adapter adapters/harmless:1 ;;
    baseline) echo --adapter adapters/baseline-union ;;
    *) echo "unknown config $1" >&2; return 2 ;;
  esac
}

for item in ${@:-$CONFIGS sweep}; do
  case $item in
    sweep) lora-arith sweep --vector helpful=adapters/helpful \
             --vector harmless=adapters/harmless --grid=-1,-0.5,0,0.5,1 \
             "${PROMPTS[@]}" --max-new-tokens 24 --batch-size 20 -o "$RESULTS/sweep" --force ;;
    pairs) mkdir -p "$RESULTS/pairs"
           for config in $CONFIGS; do  # DPO metrics only, per pair file (results.json: pairs.by_file)
             lora-arith eval $(adapters_of "$config") "${PAIRS[@]}" -o "$RESULTS/pairs/$config" --force
           done ;;
    *)     adapters="$(adapters_of "$item")"
           lora-arith eval $adapters "${PROMPTS[@]}" "${PAIRS[@]}" "${GENERATION[@]}" -o "$RESULTS/$item" --force ;;
  esac
done
