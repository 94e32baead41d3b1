"""KV cache: paged blocks and prefix hashing (`blocks`, torch-free), paged storage and
attention (`paged`), quantization codecs and eviction policies."""
