"""Sampling, shaped like libs/train: the recipe of sample.py is runs.py (which runs, the models loaded
once, each run's prompts), the text-to-image pipeline is pipeline.py, prompt file -> image files is files.py."""
