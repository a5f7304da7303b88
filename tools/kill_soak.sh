#!/usr/bin/env bash
# Kill soak: KILLS `kill -9`s of a training run at random moments —
# during start-up, before the first checkpoint, while checkpoints, the model export and sample
# grids are written — each followed by `train --resume` (or the original command while the
# folder holds no config.toml yet). After every kill, every checkpoint and the exported model
# must load (no torn file is ever picked up), and at the end the final checkpoint must equal,
# bit for bit, that of an uninterrupted run with the same seed and steps.
#
#   bash tools/kill_soak.sh                # 50 kills (by hand; the README reports such a soak)
#   bash tools/kill_soak.sh --kills 3      # the short soak CI runs (.ci/run)
#   KILLS=10 STEPS=120 bash tools/kill_soak.sh   # or --kills 10 --steps 120
#
# Prints one line per kill and a summary; exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

KILLS=${KILLS:-50}
STEPS=${STEPS:-400}
while [ $# -gt 0 ]; do
    case "$1" in
        --kills) KILLS=${2:?--kills takes a number}; shift 2 ;;
        --steps) STEPS=${2:?--steps takes a number}; shift 2 ;;
        *) echo "kill_soak.sh: unknown argument '$1' (--kills N, --steps N)" >&2; exit 2 ;;
    esac
done
case "$KILLS$STEPS" in *[!0-9]*) echo "kill_soak.sh: --kills and --steps take whole numbers" >&2; exit 2 ;; esac
WORK=${WORK:-/tmp/wgpu-diffusion-kill-soak}
SEED=${SEED:-11}
MAX_DELAY_MS=${MAX_DELAY_MS:-5000}

cargo build --release -q --bin wgpu-diffusion --example checkpoint_diff
rm -rf "$WORK"
mkdir -p "$WORK/bin"
# Copies, so a rebuild during the soak cannot mix two binaries into one run.
cp target/release/wgpu-diffusion target/release/examples/checkpoint_diff "$WORK/bin/"
BIN=$WORK/bin/wgpu-diffusion
DIFF=$WORK/bin/checkpoint_diff
ARGS=(--model tiny16 --batch-size 4 --steps "$STEPS" --checkpoint-every 3 --log-every 2
      --sample-every 50 --sample-steps 5 --keep-checkpoints 2 --seed "$SEED")

echo "== uninterrupted reference run ($STEPS steps)"
"$BIN" train "${ARGS[@]}" --out "$WORK/straight" >"$WORK/straight.log" 2>&1

RUN="$WORK/soak"
kills=0 before_first=0 during_write=0 resumes=0 fresh_starts=0 aimed_kills=0
RANDOM=$SEED
start_run() {
    if [ -f "$RUN/config.toml" ]; then
        resumes=$((resumes + 1))
        "$BIN" train --resume "$RUN" >>"$WORK/soak.log" 2>&1 &
    else
        fresh_starts=$((fresh_starts + 1))
        "$BIN" train "${ARGS[@]}" --out "$RUN" >>"$WORK/soak.log" 2>&1 &
    fi
    pid=$!
}

# Early kills (start-up, before the first checkpoint): 5 in a long soak, a third of a short one,
# so that even `--kills 3` aims one kill at a write.
EARLY=$((KILLS >= 15 ? 5 : KILLS / 3))
echo "== soak: $KILLS kills"
while [ "$kills" -lt "$KILLS" ]; do
    start_run
    # The first EARLY kills come early (start-up, before the first checkpoint); then every third
    # kill is aimed at a write: it lands as soon as a temporary file of a checkpoint or of the
    # model export appears; the rest land anywhere.
    span=$MAX_DELAY_MS
    [ "$kills" -lt "$EARLY" ] && span=2500
    delay_ms=$((200 + (RANDOM * 32768 + RANDOM) % span))
    if [ "$kills" -ge "$EARLY" ] && [ $(((kills - EARLY) % 3)) -eq 0 ]; then
        aimed=1
        t_end=$((SECONDS + 30))
        until compgen -G "$RUN/checkpoints/.*.tmp" >/dev/null || compgen -G "$RUN/.model*.tmp" >/dev/null \
            || ! kill -0 "$pid" 2>/dev/null || [ "$SECONDS" -ge "$t_end" ]; do :; done
        delay_ms=-1
    else
        aimed=0
        sleep "$(printf '%d.%03d' $((delay_ms / 1000)) $((delay_ms % 1000)))"
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
        wait "$pid" || { echo "the run failed on its own; see $WORK/soak.log"; exit 1; }
        echo "the run finished after $kills kills: raise STEPS"
        exit 1
    fi
    kill -9 "$pid"
    wait "$pid" 2>/dev/null || true
    kills=$((kills + 1))
    aimed_kills=$((aimed_kills + aimed))
    last=$({ ls "$RUN/checkpoints" 2>/dev/null || true; } | { grep -E '^step-[0-9]+\.safetensors$' || true; } | tail -1)
    partial=$({ find "$RUN" -name '.*.tmp' 2>/dev/null || true; } | wc -l)
    [ -z "$last" ] && before_first=$((before_first + 1))
    [ "$partial" -gt 0 ] && during_write=$((during_write + 1))
    if [ -d "$RUN/checkpoints" ]; then
        "$DIFF" --check "$RUN" >/dev/null || { echo "kill $kills: a torn file would be loaded"; exit 1; }
    fi
    if [ "$aimed" = 1 ]; then when="at a write"; else when="after ${delay_ms} ms"; fi
    printf 'kill %2d %-16s: last checkpoint %s, %d partial file(s) left\n' \
        "$kills" "$when" "${last:-none}" "$partial"
done

echo "== resume to the end"
if [ -f "$RUN/config.toml" ]; then
    "$BIN" train --resume "$RUN" >>"$WORK/soak.log" 2>&1
else
    "$BIN" train "${ARGS[@]}" --out "$RUN" >>"$WORK/soak.log" 2>&1
fi
final=$(printf 'step-%08d.safetensors' "$STEPS")
result=$("$DIFF" "$WORK/straight/checkpoints/$final" "$RUN/checkpoints/$final") || {
    echo "FAIL: $result"
    exit 1
}
losses() { sed -E 's/.*"loss":([^,}]*).*"step":([0-9]+).*/\2 \1/' "$1/metrics.jsonl"; }
if ! cmp -s <(losses "$WORK/straight") <(losses "$RUN"); then
    echo "FAIL: the (step, loss) rows of metrics.jsonl differ from the uninterrupted run's"
    exit 1
fi
steps_logged=$(grep -c '"step"' "$RUN/metrics.jsonl")
unique_steps=$(grep -o '"step":[0-9]*' "$RUN/metrics.jsonl" | sort -u | wc -l)
if [ "$steps_logged" != "$STEPS" ] || [ "$unique_steps" != "$STEPS" ]; then
    echo "FAIL: metrics.jsonl has $steps_logged rows ($unique_steps distinct steps), expected $STEPS"
    exit 1
fi
echo "PASS: $kills/$KILLS kills survived ($before_first before the first checkpoint, $aimed_kills aimed" \
     "at a write, $during_write of all left a partial file behind; $resumes resumes, $fresh_starts fresh starts); final checkpoint:" \
     "$result; metrics.jsonl: $STEPS rows, no duplicates, losses equal"
