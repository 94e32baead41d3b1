"""Applications built on the library packages, kept out of them (DESIGN.md section 7): the offline KV cache
policy evaluator behind `kvfleet eval-cache` (`eval_cache`) and the engine step benchmark
(`engine_bench`, which wraps the runner's methods with timers). Nothing in kvfleet.dataplane imports
them; they import torch only when run."""
