#!/usr/bin/env bash
# Grade this project the way the organizers grade a submission image, without Docker:
#   1. a clean copy of the project as the image holds it (tracked files + model_output/) in WORKDIR/workspace;
#   2. only what they mount beside it: train_data/, models/ (uvit_v1.pth, autoencoder_kl.pth,
#      caption_decoder.pth, gpt2/ — nothing else) and eval_prompts_advance/;
#   3. hub access off (HF_HUB_OFFLINE=1), the non-mounted models (CLIP folders, insightface/) only where the
#      image bakes them ($UNIDIFFUSER_EXTRA_MODELS, default build/submission/models from
#      `python tools/make_submission.py --stage-only`);
#   4. `./sample.sh > results.log 2>&1`, the parameter sum exactly as their grep | awk line computes it, then
#      `python score.py` with no arguments.
#
#   tools/grade_like_organizer.sh [--workdir grade_run] [--models models] [--train_data train_data]
#       [--prompts eval_prompts_advance] [--extra_models build/submission/models]
#       [--sample_args "--steps 20"] [--score_args "--face_backend dlib"] [--candidates N]
# The two *_args options exist for trying it on the tiny world; the organizers pass no arguments.
# --candidates N sets what `make submission --candidates N` bakes into the image ($UNIDIFFUSER_SAMPLE_ARGS,
# read by the no-argument ./sample.sh); without it the variable is taken from this environment, as it is.
set -euo pipefail
project="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
workdir="$project/grade_run"
models="$project/models"
train_data="$project/train_data"
prompts="$project/eval_prompts_advance"
extra_models="${UNIDIFFUSER_EXTRA_MODELS:-$project/build/submission/models}"
sample_args=()
score_args=()
baked_sample_args="${UNIDIFFUSER_SAMPLE_ARGS:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        --workdir) workdir="$2"; shift 2 ;;
        --models) models="$2"; shift 2 ;;
        --train_data) train_data="$2"; shift 2 ;;
        --prompts) prompts="$2"; shift 2 ;;
        --extra_models) extra_models="$2"; shift 2 ;;
        --sample_args) read -ra sample_args <<< "$2"; shift 2 ;;
        --score_args) read -ra score_args <<< "$2"; shift 2 ;;
        --candidates) baked_sample_args="--candidates $2"; shift 2 ;;
        -h|--help) sed -n '2,19p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "grade_like_organizer.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
fail() { echo "grade_like_organizer.sh: $*" >&2; exit 2; }
for path in "$models" "$train_data" "$prompts" "$project/model_output"; do
    [ -d "$path" ] || fail "$path is not a folder"
done
for name in uvit_v1.pth autoencoder_kl.pth caption_decoder.pth; do
    [ -f "$models/$name" ] || fail "$models/$name is missing (the organizers mount it)"
done
[ -d "$extra_models" ] || fail "no baked models at $extra_models: run python tools/make_submission.py --stage-only"

PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
    if [ -n "${VIRTUAL_ENV:-}" ]; then PYTHON="$VIRTUAL_ENV/bin/python"
    elif [ -x "$project/.venv/bin/python" ]; then PYTHON="$project/.venv/bin/python"
    else PYTHON=python; fi
fi
bin_dir="$(cd "$(dirname "$("$PYTHON" -c 'import sys; print(sys.executable)')")" && pwd)"
# the shared output-path rule (libs/outputs.py): WORKDIR holds nothing but an earlier grading's workspace/
PYTHONPATH="$project" "$PYTHON" -m libs.outputs "$workdir" --what "grading folder (--workdir)" --only workspace \
    || exit 2

# 1. the image's /workspace: tracked files and the trained model_output/
workspace="$workdir/workspace"
rm -rf "$workspace"
mkdir -p "$workspace"
if git -C "$project" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$project" && git ls-files -z --cached --others --exclude-standard -- . ':!model_output' ':!eval_prompts_advance' \
        | xargs -0 -I{} cp --parents -- {} "$workspace/")
else
    (cd "$project" && tar --exclude=./.venv --exclude=./models --exclude=./train_data --exclude=./outputs \
        --exclude=./grade_run --exclude=./eval_prompts_advance --exclude=./build -cf - .) | tar -xf - -C "$workspace"
fi
rm -rf "$workspace/model_output" "$workspace/outputs" "$workspace/models" "$workspace/train_data"
cp -R "$project/model_output" "$workspace/model_output"

# 2. the organizers' mounts, and nothing more
mkdir -p "$workspace/models" "$workspace/outputs"
for name in uvit_v1.pth autoencoder_kl.pth caption_decoder.pth gpt2; do
    [ -e "$models/$name" ] && ln -s "$(cd "$models" && pwd)/$name" "$workspace/models/$name"
done
ln -s "$(cd "$train_data" && pwd)" "$workspace/train_data"
ln -s "$(cd "$prompts" && pwd)" "$workspace/eval_prompts_advance"

# 3. + 4. inside the "container"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNIDIFFUSER_EXTRA_MODELS="$(cd "$extra_models" && pwd)"
export UNIDIFFUSER_SAMPLE_ARGS="$baked_sample_args"
[ -z "$baked_sample_args" ] || echo "the image's sample.sh settings: $baked_sample_args"
export VIRTUAL_ENV="$(dirname "$bin_dir")" PATH="$bin_dir:$PATH"
cd "$workspace"
started=$(date +%s)
if ! ./sample.sh ${sample_args[@]+"${sample_args[@]}"} > "$workspace/results.log" 2>&1; then
    tail -n 20 "$workspace/results.log" >&2
    fail "sample.sh failed (the whole log: $workspace/results.log)"
fi
sampled=$(( $(date +%s) - started ))
sum=$(cat "$workspace/results.log" | grep 'finetuned parameters' | awk '{s+=$(NF)} END {print s}')
lines=$(grep -c 'finetuned parameters' "$workspace/results.log" || true)
python score.py ${score_args[@]+"${score_args[@]}"}
echo "sample.sh: ${sampled}s; finetuned parameters: ${sum} (the sum of ${lines} 'finetuned parameters' lines in $workspace/results.log)"
