"""Model families with Hugging Face parameter names, loaded from and saved to HF folders."""

from pocketr1.model.config import ModelConfig
from pocketr1.model.hf import build_model, load_model, save_model
from pocketr1.model.transformer import Transformer

__all__ = ["ModelConfig", "Transformer", "build_model", "load_model", "save_model"]
