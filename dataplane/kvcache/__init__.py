"""KV cache, a closed layer under the engine (it imports nothing from engine/): paged blocks and prefix
hashing (`blocks`, torch-free); one storage interface (`storage.KVStorage`, plain `paged` and quantized
`paged_quant`) built from a CachePolicy by `build.kv_storage_spec`; the paged attention backend
(`paged`); quantization codecs, eviction policies and KV transfer."""
