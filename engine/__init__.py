"""pdserve's shared model runtime: config, model, paged KV cache, sampling, and the runner that drives them.

Only `engine.runner.ModelRunner` touches the device; everything else here is plain bookkeeping or math.
"""
