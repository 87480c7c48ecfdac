"""Task registry, readers for every data source, and tokenization."""
