#!/usr/bin/env bash
# Every sampling run of this folder, in ONE Python process (the base models are loaded once):
#   eval_prompts/<name>.json                    + model_output/<name> -> outputs/<name>
#   eval_prompts_advance/<name>_{sim,edit}.json + model_output/<name> -> outputs/<name>_{sim,edit}
# for boy1 boy2 girl1 girl2, whichever prompt files exist (the organizers run it with no arguments).
#   ./sample.sh [--advanced | --preliminary] [extra sample.py args, e.g. --skip_existing --steps 50]
# Each prompt file prints exactly one `finetuned parameters: <int>` line. Inputs are all checked first.
# $UNIDIFFUSER_SAMPLE_ARGS goes before the arguments: the submission image bakes its settings there
# (e.g. best-of-N: "--candidates 4", set by `make submission ARGS="--candidates 4"`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

# the active environment's python; else the project's .venv when there is one
PYTHON=python
if [ -z "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] && [ -x .venv/bin/python ]; then
    PYTHON=.venv/bin/python
fi
read -ra baked <<< "${UNIDIFFUSER_SAMPLE_ARGS:-}"
exec "$PYTHON" sample.py --all ${baked[@]+"${baked[@]}"} "$@"
