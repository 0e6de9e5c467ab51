"""The embedded default: a tiny Qwen3-architecture model pretrained on addition, and its tokenizer."""
from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"
