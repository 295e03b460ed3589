"""lorapipe: instruction data to a fine-tuned, verified, vLLM-served model (QLoRA SFT, merge, compare, serve)."""

__version__ = "0.1.0"
