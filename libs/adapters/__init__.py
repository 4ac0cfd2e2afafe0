"""Adapters: the peft families that personalize the U-ViT (families.py)."""
