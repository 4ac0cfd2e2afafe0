#!/usr/bin/env bash
# One sample.py run per subject: eval_prompts/<name>.json with model_output/<name> -> outputs/<name>.
#   ./sample.sh [--advanced] [extra sample.py args...]
# --advanced runs the 8-run split instead: eval_prompts_advance/<name>_{sim,edit}.json -> outputs/<name>_{sim,edit}.
# Extra arguments go to every sample.py run (e.g. --skip_existing, --steps 50).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

# the active environment's python; else the project's .venv when there is one
PYTHON=python
if [ -z "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] && [ -x .venv/bin/python ]; then
    PYTHON=.venv/bin/python
fi

ADVANCED=0
EXTRA=()
for arg in "$@"; do
    if [ "$arg" = "--advanced" ]; then
        ADVANCED=1
    else
        EXTRA+=("$arg")
    fi
done

run() {  # run <model dir> <prompt file> <output dir>
    echo "== sample.py: $2 with $1 -> $3"
    if ! "$PYTHON" sample.py --restore_path "$1" --prompt_path "$2" --output_path "$3" "${EXTRA[@]+"${EXTRA[@]}"}"; then
        echo "sample.sh: sampling $2 -> $3 failed; stopping" >&2
        exit 1
    fi
}

for name in boy1 boy2 girl1 girl2; do
    if [ "$ADVANCED" = 1 ]; then
        for split in sim edit; do
            run "model_output/${name}" "eval_prompts_advance/${name}_${split}.json" "outputs/${name}_${split}"
        done
    else
        run "model_output/${name}" "eval_prompts/${name}.json" "outputs/${name}"
    fi
done
echo "sample.sh: all runs finished"
