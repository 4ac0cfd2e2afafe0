#!/usr/bin/env bash
# Train the four competition subjects, in order: boy1 boy2 girl1 girl2 (libs/layout.py).
#
#   ./train.sh [extra train.py flags...]        e.g. ./train.sh --train_step 600 --rank 16
#   ./train.sh --auto_recipe                     a budgeted recipe search per subject (libs/train/auto_recipe.py)
#
# Photos: train_data_crop/<name> when it exists (made by `python tools/crop.py`), else
# train_data/<name>. Output: model_output/<name>. Prior preservation uses class_data/boy or
# class_data/girl when present (`python tools/class_images.py ...`), and is switched off otherwise.
# A re-run continues an interrupted subject (or recipe search) and skips finished ones (--resume latest); pass
# --overwrite to train everything again. Stops at the first subject that fails.
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
for arg in "$@"; do
    case "$arg" in
        --overwrite|--resume|--resume=*) resume=() ;;
    esac
done

for subject in $subjects; do
    IFS=: read -r name class_word data out <<< "$subject"
    if [ ! -d "$data" ]; then
        echo "train.sh: no photos for $name (looked in train_data_crop/$name and train_data/$name)" >&2
        exit 1
    fi
    if [ -d "class_data/$class_word" ]; then
        prior=(--class_data_dir "class_data/$class_word")
    else
        prior=(--no_prior_preservation)
        echo "train.sh: no class_data/$class_word: training $name without prior preservation" >&2
    fi
    echo "=== $name: $data -> $out"
    if ! "$ACCELERATE" launch --mixed_precision fp16 --num_processes 1 train.py \
            -d "$data" -o "$out" "${prior[@]}" ${resume[@]+"${resume[@]}"} "$@"; then
        echo "train.sh: training $name failed (see above); stopping, later subjects were not trained" >&2
        exit 1
    fi
done
echo "train.sh: all four subjects trained into model_output/"
