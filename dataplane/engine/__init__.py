"""The engine: scheduler (torch-free), model runner, sampler; step = schedule -> run -> postprocess."""
