#!/bin/bash
# bash docs/findings/smollm2/one_at_a_time.sh PROJECT OUT: ppo, dpo and grpo of a finished lifecycle run in PROJECT,
# each alone on every core (what `launch.jobs: 1` runs), from the run's sft policy and reward model, into
# OUT/<stage>; OUT/<stage>.time is /usr/bin/time -v's report. The run's own outputs are left as they are.
set -e
project=$(realpath "$1"); out=$(realpath -m "$2")
cd "$project"
export PATH="$project/.venv/bin:$PATH"
for s in ppo dpo grpo; do
  mkdir -p "$out/$s"
  /usr/bin/time -v python -m tasks.$s --policy out/sft/model --reward-model out/reward/model \
    --checkpoints "$out/$s/checkpoints" --out "$out/$s" > "$out/$s.log" 2> "$out/$s.time"
  rm -rf "$out/$s/checkpoints" "$out/$s/model"
done
