"""Adapters on the U-ViT and the text encoder: the LoRA mechanics over peft (lora.py) and the spec §7
changed-parameter count (param_count.py). A new adapter family gets its own module here."""
