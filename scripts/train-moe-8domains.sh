#!/usr/bin/env bash
# Trains trained/moe-8domains (issue 27): starts the run in the background, or resumes it, or
# does nothing while it runs. Idempotent: call it at the start of every session.
#
#   scripts/train-moe-8domains.sh [start]   build corpus + tokenizer if missing, start/resume training
#   scripts/train-moe-8domains.sh status    is it running, last log lines
#   scripts/train-moe-8domains.sh sync      copy tokenizer, manifest and log into trained/moe-8domains/
#   scripts/train-moe-8domains.sh stop      end the run (it resumes from its last checkpoint later)
#
# Everything the run writes lives OUTSIDE the checkout (the checkout is re-created between
# sessions): $SNIPER_TRAIN_DIR, default /var/tmp/sniper-train/moe-8domains, holds the corpus,
# token streams, tokenizer.json, corpus-manifest.json, train-log.jsonl, checkpoints/last.pt
# (written atomically every 100 steps; a kill at any moment loses at most 100 steps) and
# train.out (stdout and stderr). `start` and `sync` copy the small artifacts into
# trained/moe-8domains/ for committing. Where that folder already holds a tokenizer.json and the
# run folder does not (a new machine), the committed tokenizer is used, so token ids stay the same.
#
# The run is nice'd (nice -n 19), on 2 torch threads with passive OpenMP waiting, in its own
# session (setsid nohup), so it survives the shell that started it.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUN=${SNIPER_TRAIN_DIR:-/var/tmp/sniper-train/moe-8domains}
DEST=$ROOT/trained/moe-8domains
PY=${PYTHON:-$ROOT/.venv/bin/python}
PIDFILE=$RUN/train.pid

# The recipe (trained/moe-8domains/README.md explains each choice). Changing any of it makes the
# checkpoint refuse to resume ("trained with another config"): start a new RUN folder instead.
ARGS=(--out "$RUN" --work "$RUN" --threads 2
      --domains 8domains --vocab-size 8192
      --n-ctx 256 --n-layer 8 --n-embd 192 --n-head 6 --n-head-kv 2 --head-dim 32
      --n-expert 128 --n-expert-used 8 --n-ff-exp 64
      --steps 6000 --batch-size 16 --lr 2e-3 --warmup-steps 200 --eval-every 250 --checkpoint-every 100
      --aux-coef 0.001 --balance-scope global --bias-rate 0 --seed 0)

log() { echo "train-moe-8domains: $*"; }

running_pid() {  # prints the pid of the live training process, if any
    [[ -f $PIDFILE ]] || return 1
    local pid
    pid=$(cat "$PIDFILE")
    [[ -n $pid && -r /proc/$pid/cmdline ]] || return 1
    tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q -- "cluster.train train .*--out $RUN " || return 1
    echo "$pid"
}

sync_artifacts() {
    mkdir -p "$DEST"
    local f
    for f in tokenizer.json corpus-manifest.json train-log.jsonl; do
        [[ -f $RUN/$f ]] && cp "$RUN/$f" "$DEST/$f.tmp" && mv "$DEST/$f.tmp" "$DEST/$f"
    done
    log "copied $(cd "$RUN" && ls tokenizer.json corpus-manifest.json train-log.jsonl 2>/dev/null | tr '\n' ' ')to $DEST"
}

ensure_torch() {
    # The CPU build, named exactly: PyPI's plain torch==2.13.0 wheel pulls about 17 nvidia-* and
    # triton packages (CUDA 13); the project's machines carry torch-2.13.0+cpu in their pip
    # wheel folder (pip's find-links), where `pip install -e ".[train]"` also resolves to it.
    if "$PY" -c "import torch, tokenizers" 2>/dev/null; then
        "$PY" -c "import sys, torch; sys.exit(torch.version.cuda is not None)" \
            || log "warning: the installed torch is a CUDA build ($("$PY" -c 'import torch; print(torch.__version__)')); it runs on CPU but is large"
        return
    fi
    if ! "$PY" -m pip install --quiet "torch==2.13.0+cpu" "tokenizers>=0.15"; then
        log "could not install torch==2.13.0+cpu (the CPU wheel); install it, then call this again" >&2
        exit 1
    fi
}

start() {
    mkdir -p "$RUN"
    exec 9> "$RUN/.lock"
    if ! flock -n 9; then
        log "another call is starting the run; nothing to do"
        return 0
    fi
    local pid
    if pid=$(running_pid); then
        log "already running (pid $pid); nothing to do"
        sync_artifacts
        return 0
    fi
    ensure_torch
    cd "$ROOT"
    if [[ ! -f $RUN/corpus/manifest.json ]]; then
        log "building the corpus under $RUN/corpus"
        nice -n 19 "$PY" -m cluster.train corpus "${ARGS[@]}"
    fi
    if [[ -f $DEST/corpus-manifest.json ]] && ! cmp -s "$DEST/corpus-manifest.json" "$RUN/corpus-manifest.json"; then
        log "warning: the corpus built here differs from the committed $DEST/corpus-manifest.json (other files on this machine)" >&2
    fi
    if [[ ! -f $RUN/tokenizer.json ]]; then
        if [[ -f $DEST/tokenizer.json ]]; then
            log "using the committed tokenizer $DEST/tokenizer.json"
            cp "$DEST/tokenizer.json" "$RUN/tokenizer.json"
        else
            log "training the tokenizer"
            nice -n 19 "$PY" -m cluster.train tokenizer "${ARGS[@]}"
        fi
    fi
    if [[ -f $RUN/checkpoints/last.pt ]]; then
        log "resuming from $RUN/checkpoints/last.pt"
    else
        log "starting a new run"
    fi
    # cluster.train sets OMP_WAIT_POLICY=PASSIVE itself; said here too for the record
    OMP_WAIT_POLICY=PASSIVE setsid nohup nice -n 19 "$PY" -m cluster.train train "${ARGS[@]}" \
        >> "$RUN/train.out" 2>&1 < /dev/null 9>&- &
    echo $! > "$PIDFILE"
    sleep 2
    if pid=$(running_pid); then
        log "training in the background (pid $pid), log $RUN/train.out"
    else
        log "the training process ended at once; see $RUN/train.out" >&2
        tail -n 20 "$RUN/train.out" >&2
        exit 1
    fi
    sync_artifacts
}

case ${1:-start} in
    start) start ;;
    status)
        if pid=$(running_pid); then log "running (pid $pid)"; else log "not running"; fi
        [[ -f $RUN/train-log.jsonl ]] && tail -n 3 "$RUN/train-log.jsonl"
        ;;
    sync) sync_artifacts ;;
    stop)
        if pid=$(running_pid); then kill "$pid" && log "stopped pid $pid"; else log "not running"; fi
        ;;
    *) echo "usage: $0 [start|status|sync|stop]" >&2; exit 2 ;;
esac
