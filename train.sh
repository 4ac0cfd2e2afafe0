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

# the subjects and their class words come from libs/layout.py, read with the python that runs train.py
# (the one beside accelerate): "boy1:boy boy2:boy girl1:girl girl2:girl"
PYTHON=${PYTHON:-$(dirname "$(command -v "$ACCELERATE")")/python}
[ -x "$PYTHON" ] || PYTHON=python3
if ! subjects=$("$PYTHON" -c 'from libs.layout import SUBJECTS, class_word_from_path as word
print(*(f"{name}:{word(name)}" for name in SUBJECTS))'); then
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
    name=${subject%%:*}
    class_word=${subject#*:}
    data="train_data_crop/$name"
    [ -d "$data" ] || data="train_data/$name"
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
    echo "=== $name: $data -> model_output/$name"
    if ! "$ACCELERATE" launch --mixed_precision fp16 --num_processes 1 train.py \
            -d "$data" -o "model_output/$name" "${prior[@]}" ${resume[@]+"${resume[@]}"} "$@"; then
        echo "train.sh: training $name failed (see above); stopping, later subjects were not trained" >&2
        exit 1
    fi
done
echo "train.sh: all four subjects trained into model_output/"
