"""Class images for prior preservation: the class-set folder a training run reads (folder.py) and the
two ways of making one, CelebA selection and generation with the base model (sources.py)."""
