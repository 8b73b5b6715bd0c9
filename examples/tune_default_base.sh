#!/usr/bin/env bash
# Tune η on the default base with the shipped vectors (issue 15 §6): maximise the refusal rate on
# unsafe XSTest eval prompts subject to compliance_rate>=0.9 on the safe ones, with the held-out
# ordinary prompts as a third kind. Compared under the same constraint: the union baseline tuned
# on its single η in [0, 3], and each vector alone (η in [0, 3]). Results: examples/results/tune/.
# Run from the repository root:  bash examples/tune_default_base.sh   (env: TOKENS, PAIR_BUDGET, SINGLE_BUDGET, ORDINARY, LIMIT)
set -euo pipefail
TOKENS=${TOKENS:-24}
PAIR_BUDGET=${PAIR_BUDGET:-18}
SINGLE_BUDGET=${SINGLE_BUDGET:-6}
OUT=examples/results/tune
DATA=../shared/data
mkdir -p "$OUT"
python examples/ordinary_prompts.py --count "${ORDINARY:-200}" -o "$OUT/ordinary.jsonl" --force
common=(--prompts "$DATA/eval/xstest_prompts.jsonl" --prompts "$OUT/ordinary.jsonl"
        --maximize refusal_rate --subject-to 'compliance_rate>=0.9' --split 0.5 --seed 0
        --max-new-tokens "$TOKENS" --batch-size 16 --device cpu --force)
if [ -n "${LIMIT:-}" ]; then common+=(--limit "$LIMIT"); fi   # the first LIMIT prompts of each kind
# The four runs are independent and run side by side; the same --split/--seed give every run the same
# tuning and held-out prompts. The pair's frontier shows the union baseline and each vector at η = 1.
python -m lora_arith tune --vector union=adapters/baseline-union --bounds=0,3 \
    --budget "$SINGLE_BUDGET" "${common[@]}" -o "$OUT/union" > "$OUT/union.log" 2>&1 &
python -m lora_arith tune --vector helpful=adapters/helpful --bounds=0,3 \
    --budget "$SINGLE_BUDGET" "${common[@]}" -o "$OUT/helpful" > "$OUT/helpful.log" 2>&1 &
python -m lora_arith tune --vector harmless=adapters/harmless --bounds=0,3 \
    --budget "$SINGLE_BUDGET" "${common[@]}" -o "$OUT/harmless" > "$OUT/harmless.log" 2>&1 &
python -m lora_arith tune --vector helpful=adapters/helpful \
    --vector harmless=adapters/harmless --bounds=0,2 --budget "$PAIR_BUDGET" \
    --compare union=adapters/baseline-union:1 \
    --compare helpful-alone=adapters/helpful:1 \
    --compare harmless-alone=adapters/harmless:1 \
    "${common[@]}" -o "$OUT/pair" > "$OUT/pair.log" 2>&1 &
wait
tail -n 3 "$OUT"/*.log
