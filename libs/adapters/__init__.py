"""Adapters on the U-ViT and the text encoder: the LoRA mechanics over peft (lora.py), the adapter families
of the U-ViT (families.py: LoRA, DoRA, LoHa, LoKr, VeRA, OFT) and the spec §7 changed-parameter count
(param_count.py)."""
