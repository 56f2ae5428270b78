"""The inference engine: scheduler → model runner → sampler over a paged KV cache."""
