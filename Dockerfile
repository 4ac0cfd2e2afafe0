# The submission image: code + trained model_output/ + the models the organizers do NOT mount (CLIP ViT-L/14
# text encoder and tokenizer, CLIP ViT-B/32, insightface buffalo_l), with hub access off.
# Build it with `make submission` (tools/make_submission.py stages the models into build/submission/models
# first). The organizers mount eval_prompts_advance/, train_data/ and models/ (uvit_v1.pth, autoencoder_kl.pth,
# caption_decoder.pth, gpt2/) into /workspace and run, with no arguments:
#   /workspace/sample.sh > /workspace/results.log 2>&1 ; python score.py
FROM pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    UNIDIFFUSER_EXTRA_MODELS=/opt/unidiffuser/models

WORKDIR /workspace

# the base image's CUDA torch satisfies requirements.txt's torch range, so pip keeps it; requirements-nodeps.txt
# holds insightface, whose declared GUI opencv-python (cv2 linking libxcb/libGL) must not come in: the only OpenCV
# is opencv-python-headless, and no system library is needed on top of the base (`make image-check` proves it
# in a bare Debian root)
COPY requirements.txt requirements-nodeps.txt ./
RUN pip install -r requirements.txt && pip install --no-deps -r requirements-nodeps.txt

# CLIP folders and insightface/models/buffalo_l, looked up here when models/ lacks them (libs/config.py)
COPY build/submission/models/ /opt/unidiffuser/models/
COPY . .
RUN chmod +x train.sh sample.sh

# sampling settings the no-argument ./sample.sh adds (make submission --candidates N sets best-of-N here)
ARG SAMPLE_ARGS=""
ENV UNIDIFFUSER_SAMPLE_ARGS="${SAMPLE_ARGS}"

VOLUME ["/workspace/models"]
CMD ["bash"]
