#!/usr/bin/env bash
# Train the four competition subjects, in order: boy1 boy2 girl1 girl2 (libs/layout.py).
#
#   ./train.sh [extra train.py flags...]        e.g. ./train.sh --train_step 600 --rank 16
#   ./train.sh --auto_recipe                     a budgeted recipe search per subject (libs/train/auto_recipe.py)
#   ./train.sh --devices cuda:0,cuda:1 [...]     the subjects concurrently, one process per device (cpu,cpu
#                                                without GPUs); each subject's output in model_output/<name>/logs/train_sh.log
#
# Photos: train_data_crop/<name> when it exists (made by `python tools/crop.py`), else
# train_data/<name>. Output: model_output/<name>. Prior preservation uses class_data/boy or
# class_data/girl when present (`python tools/class_images.py ...`), and is switched off otherwise.
# A re-run continues an interrupted subject (or recipe search) and skips finished ones (--resume latest); pass
# --overwrite to train everything again. In order, it stops at the first subject that fails; with --devices
# every subject runs to its end and the first failure is reported with its subject and log.
set -euo pipefail
cd "$(dirname "$0")"

ACCELERATE=${ACCELERATE:-accelerate}
if ! command -v "$ACCELERATE" >/dev/null 2>&1; then
    if [ -x .venv/bin/accelerate ]; then
        ACCELERATE=.venv/bin/accelerate
    else
        echo "train.sh: 'accelerate' not found; activate the environment (or set ACCELERATE=/path/to/accelerate)" >&2
        exit 1
    fi
fi

# the subjects, their class words, photos and output folders come from libs/layout.py, read with the python
# that runs train.py (the one beside accelerate): "boy1:boy:train_data/boy1:model_output/boy1 ..."
PYTHON=${PYTHON:-$(dirname "$(command -v "$ACCELERATE")")/python}
[ -x "$PYTHON" ] || PYTHON=python3
if ! subjects=$("$PYTHON" -c 'from libs.layout import training_runs; print(*training_runs())'); then
    echo "train.sh: cannot read the subject list from libs/layout.py with $PYTHON (set PYTHON=/path/to/python)" >&2
    exit 1
fi

resume=(--resume latest)
devices=""
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --devices) [ $# -ge 2 ] || { echo "error: --devices needs a list, e.g. cuda:0,cuda:1" >&2; exit 2; }
                   devices=$2; shift 2; continue ;;
        --devices=*) devices=${1#*=} ;;
        --overwrite|--resume|--resume=*) resume=(); args+=("$1") ;;
        *) args+=("$1") ;;
    esac
    shift
done

# SIGTERM / SIGINT (a scheduler, `docker stop`, kill): passed on to the training processes, which finish their
# step, write a checkpoint and exit (libs/stopping.py); no further subject starts; then train.sh exits 128 + signal
# saying how to continue. `children` are the processes to pass it to; `stop_signal` is set once one came.
stop_signal=""
children=()
pass_on() {
    stop_signal=$1
    local pid
    for pid in ${children[@]+"${children[@]}"}; do
        kill -s "$1" "$pid" 2>/dev/null || true
    done
}
trap 'pass_on TERM' TERM
trap 'pass_on INT' INT

# wait for a process to its end (a trapped signal interrupts `wait`); its exit status
wait_for() {
    local status=0
    wait "$1" || status=$?
    while kill -0 "$1" 2>/dev/null; do
        status=0
        wait "$1" || status=$?
    done
    return "$status"
}

stopped_message() {
    echo "train.sh: stopped by SIG$stop_signal: the subjects in training wrote a checkpoint; run the same" \
         "./train.sh command again to continue them (finished subjects are skipped)" >&2
}

# one subject: train.py through accelerate, on the devices this process sees, in the background (its pid in
# `child`) so that a signal reaches it (accelerate passes it on to train.py)
train_subject() {
    local name=$1 class_word=$2 data=$3 out=$4 prior
    if [ -d "class_data/$class_word" ]; then
        prior=(--class_data_dir "class_data/$class_word")
    else
        prior=(--no_prior_preservation)
        echo "train.sh: no class_data/$class_word: training $name without prior preservation" >&2
    fi
    "$ACCELERATE" launch --mixed_precision fp16 --num_processes 1 train.py \
        -d "$data" -o "$out" "${prior[@]}" ${resume[@]+"${resume[@]}"} ${args[@]+"${args[@]}"} &
    child=$!
}

if [ -z "$devices" ]; then
    for subject in $subjects; do
        IFS=: read -r name class_word data out <<< "$subject"
        if [ ! -d "$data" ]; then
            echo "train.sh: no photos for $name (looked in train_data_crop/$name and train_data/$name)" >&2
            exit 1
        fi
        echo "=== $name: $data -> $out"
        train_subject "$name" "$class_word" "$data" "$out"
        children=("$child")
        status=0
        wait_for "$child" || status=$?
        if [ -n "$stop_signal" ]; then
            stopped_message
            exit $((128 + $(kill -l "$stop_signal")))
        fi
        if [ "$status" -ne 0 ]; then
            echo "train.sh: training $name failed (see above); stopping, later subjects were not trained" >&2
            exit 1
        fi
    done
    echo "train.sh: all four subjects trained into model_output/"
    exit 0
fi

# --devices: "<device> <CUDA_VISIBLE_DEVICES>" per device (libs/devices.py; a bad list: error, exit 2)
device_lines=$("$PYTHON" -m libs.devices "$devices") || exit 2
mapfile -t device_list <<< "$device_lines"
for subject in $subjects; do
    IFS=: read -r name class_word data out <<< "$subject"
    if [ ! -d "$data" ]; then
        echo "train.sh: no photos for $name (looked in train_data_crop/$name and train_data/$name); nothing trained" >&2
        exit 1
    fi
done
status_dir=$(mktemp -d)
trap 'rm -rf "$status_dir"' EXIT
read -r -a all_subjects <<< "$subjects"
count=${#device_list[@]}
for index in "${!device_list[@]}"; do
    read -r device visible <<< "${device_list[$index]}"
    [ "$visible" = "-" ] && visible=""
    (   # this device's subjects, one after another: subjects index, index + count, ...
        export CUDA_VISIBLE_DEVICES=$visible
        children=()
        trap 'pass_on TERM' TERM
        trap 'pass_on INT' INT
        for ((j = index; j < ${#all_subjects[@]}; j += count)); do
            [ -n "$stop_signal" ] && break
            IFS=: read -r name class_word data out <<< "${all_subjects[$j]}"
            mkdir -p "$out/logs"
            echo "=== $name: $data -> $out on $device (log: $out/logs/train_sh.log)"
            train_subject "$name" "$class_word" "$data" "$out" > "$out/logs/train_sh.log" 2>&1
            children=("$child")
            if wait_for "$child"; then
                echo "=== $name: done"
            elif [ -n "$stop_signal" ]; then
                echo "=== $name: stopped on $device by SIG$stop_signal (log: $out/logs/train_sh.log)"
            else
                echo "$j $name $device $out/logs/train_sh.log" > "$status_dir/failed-$j"
                echo "=== $name: failed on $device (log: $out/logs/train_sh.log)"
            fi
        done
    ) &
    children+=("$!")
done
for pid in "${children[@]}"; do
    wait_for "$pid" || true
done
if [ -n "$stop_signal" ]; then
    stopped_message
    exit $((128 + $(kill -l "$stop_signal")))
fi
failed=$(cat "$status_dir"/failed-* 2>/dev/null | sort -n || true)
if [ -n "$failed" ]; then
    read -r _ name device log <<< "$(head -n 1 <<< "$failed")"
    echo "train.sh: training $name failed on $device; the other subjects ran to their end (log: $log):" >&2
    grep '^error:' "$log" >&2 || tail -n 15 "$log" >&2  # train.py's own message, else the end of the log
    others=$(tail -n +2 <<< "$failed" | awk '{print $2}' | xargs)
    [ -n "$others" ] && echo "train.sh: also failed: $others" >&2
    exit 1
fi
echo "train.sh: all four subjects trained into model_output/ on ${devices}"
