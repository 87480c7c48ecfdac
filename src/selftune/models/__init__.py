"""Models: loading (safetensors only), the [CLS] normalizers and heads, packed read-out."""
