"""argrpo: GRPO fine-tuning of token-based autoregressive image generators."""

__version__ = "0.1.0"
