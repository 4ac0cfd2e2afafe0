# GPU image for the real pipeline. Weights are not baked in: mount them at /workspace/models.
#   docker build -t unidiffuser-face .
#   docker run --gpus all --rm -it -v "$PWD/models:/workspace/models" -v "$PWD/train_data:/workspace/train_data" \
#       -v "$PWD/eval_prompts:/workspace/eval_prompts" -v "$PWD/model_output:/workspace/model_output" \
#       -v "$PWD/outputs:/workspace/outputs" unidiffuser-face bash -c "./train.sh && ./sample.sh && python score.py"
FROM pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/workspace/models/.hf_cache

WORKDIR /workspace

# the base image's CUDA torch satisfies requirements.txt's torch range, so pip keeps it
COPY requirements.txt requirements-nodeps.txt ./
RUN pip install -r requirements.txt && pip install --no-deps -r requirements-nodeps.txt

COPY . .
RUN chmod +x train.sh sample.sh

VOLUME ["/workspace/models"]
CMD ["bash"]
