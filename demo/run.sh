#!/usr/bin/env bash
# `make demo`: the main job end to end, offline, with nothing downloaded.
#   1. write text with demo/make_corpus.py (fables, and weather reports the base model never saw);
#   2. pretrain a tiny base model from scratch on the fables;
#   3. fine-tune it on the weather reports;
#   4. generate with it, against the base, and evaluate both on held-out reports.
set -euo pipefail
cd "$(dirname "$0")/.."
LMTUNE=".venv/bin/lmtune"
OUT="${DEMO_OUT:-demo/out}"  # DEMO_OUT: where the tests run it
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

step() { printf '\n\033[1m== %s\033[0m\n$' "$1"; printf ' %q' "${@:2}"; printf '\n'; "${@:2}"; }

.venv/bin/python demo/make_corpus.py "$OUT"
step "Pretrain a tiny base model from scratch" \
  $LMTUNE finetune --recipe tiny-scratch --data "$OUT/stories.txt" --output "$OUT/base" --overwrite
step "Fine-tune it on weather reports" \
  $LMTUNE finetune "$OUT/base" --recipe tiny-cpu --data "$OUT/weather-train.txt" --output "$OUT/finetuned" --overwrite
step "Generate with the fine-tuned model (the latest run)" \
  $LMTUNE generate "Weather report for Oslo" --max-new-tokens 40 --seed 0
step "Compare with the base model, greedy" \
  $LMTUNE generate "Weather report for Lima" --greedy --max-new-tokens 40 --compare "$OUT/base"
step "Evaluate both on held-out weather reports" \
  $LMTUNE eval "$OUT/base" "$OUT/finetuned" --data "$OUT/weather-test.txt"
