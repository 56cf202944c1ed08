#!/usr/bin/env bash
# dpo and grpo (both start from sft) one after the other on two threads each, then side by side on one thread
# each, on a project whose lifecycle has run: `bash docs/findings/speed/side_by_side.sh PROJECT OUT > OUT/times.txt`
# (the stages' metrics.json in OUT say whether their figures changed).
set -euo pipefail
project=$(realpath "$1"); out=$(realpath -m "$2"); mkdir -p "$out"
cd "$project"
export LMFORGE_TRACKING=off
stage() { python -m tasks.$1 --policy out/sft/model --reward-model out/reward/model --checkpoints "$out/$1-$2-ck" --out "$out/$1-$2" > "$out/$1-$2.log" 2>&1; }
t0=$(date +%s.%N)
stage dpo seq; stage grpo seq
t1=$(date +%s.%N)
OMP_NUM_THREADS=1 stage dpo par & OMP_NUM_THREADS=1 stage grpo par; wait
t2=$(date +%s.%N)
echo "sequential $(echo "$t1 - $t0" | bc) concurrent $(echo "$t2 - $t1" | bc)"  # seconds
