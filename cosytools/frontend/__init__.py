"""Frontend: text tokenizer (audio features and ONNX sub-models live beside it)."""
from .tokenizer import CosyVoice3Tokenizer

__all__ = ["CosyVoice3Tokenizer"]
