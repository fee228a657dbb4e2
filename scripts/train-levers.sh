#!/usr/bin/env bash
# Short runs of each balancing lever of cluster.train (issue 27, item 1), one after the other, in
# the background under nice, beside the moe-8domains run whose corpus, token streams and tokenizer
# they share: the same shape (8 layers, 128 experts top-8, expert FFN 64) for STEPS steps each,
# then export + routing (routing.json: top-third mass, LRU/MIN hit rates per residency) for each
# run that exports (the DeepSeek-V3 bias run does not: qwen3moe in llama.cpp selects without a
# bias; its train-log's eval lines give experts used and max load per layer).
#
#   scripts/train-levers.sh [start]   start (or resume: each run resumes from its checkpoint) in the background
#   scripts/train-levers.sh status    last line of each run's log
#
# Disk: about 0.5 GB per run (checkpoint) plus an 81 MB GGUF, under $SNIPER_TRAIN_DIR/../levers.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BASE=${SNIPER_TRAIN_DIR:-/var/tmp/sniper-train/moe-8domains}
LEVERS=$(dirname "$BASE")/levers
PY=${PYTHON:-$ROOT/.venv/bin/python}
STEPS=${STEPS:-200}
SHAPE=(--threads 2 --domains 8domains --vocab-size 8192 --n-ctx 256 --n-layer 8 --n-embd 192 --n-head 6
       --n-head-kv 2 --head-dim 32 --n-expert 128 --n-expert-used 8 --n-ff-exp 64 --batch-size 16 --lr 2e-3
       --seed 0 --steps "$STEPS" --warmup-steps 20 --eval-every 100 --checkpoint-every 100)
RUNS=("global-0.001:--aux-coef 0.001 --balance-scope global"
      "global-0.01:--aux-coef 0.01 --balance-scope global"
      "sequence-0.001:--aux-coef 0.001 --balance-scope sequence"
      "bias-1e-4:--aux-coef 0 --bias-rate 1e-4")

run_all() {
    local spec name args W
    for spec in "${RUNS[@]}"; do
        name=${spec%%:*}; args=${spec#*:}; W=$LEVERS/$name
        mkdir -p "$W"
        ln -sfn "$BASE/corpus" "$W/corpus"; ln -sfn "$BASE/tokens" "$W/tokens"
        cp "$BASE/tokenizer.json" "$BASE/corpus-manifest.json" "$W/"
        # shellcheck disable=SC2086
        nice -n 19 "$PY" -m cluster.train train --out "$W" --work "$W" "${SHAPE[@]}" $args >> "$W/train.out" 2>&1
        if [[ $name != bias-* ]]; then
            "$PY" -m cluster.train export --out "$W" --work "$W" >> "$W/train.out" 2>&1
            nice -n 19 "$PY" -m cluster.train routing --out "$W" --work "$W" >> "$W/train.out" 2>&1
        fi
    done
    echo "all lever runs done" >> "$LEVERS/levers.out"
}

case ${1:-start} in
    start)
        mkdir -p "$LEVERS"
        export OMP_WAIT_POLICY=PASSIVE
        setsid nohup bash "$0" run-all >> "$LEVERS/levers.out" 2>&1 < /dev/null &
        echo "train-levers: running in the background, logs under $LEVERS/*/train.out";;
    run-all) run_all;;
    status)
        for spec in "${RUNS[@]}"; do
            name=${spec%%:*}
            echo "$name: $(tail -1 "$LEVERS/$name/train-log.jsonl" 2>/dev/null | cut -c1-160)"
        done;;
    *) echo "usage: $0 [start|status]" >&2; exit 2;;
esac
