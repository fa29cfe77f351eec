"""Tests never touch the network: the hub is offline (huggingface_hub reads this at import)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
