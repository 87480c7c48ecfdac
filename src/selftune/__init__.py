"""selftune: more accurate and more stable fine-tuning of pretrained Transformer encoders."""

__version__ = "0.1.0"
