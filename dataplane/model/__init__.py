"""Llama-family model, HF-format loader, tokenizer, GGUF import, tiny test models."""
