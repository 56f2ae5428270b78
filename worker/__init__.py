"""headrace worker: the Redis-facing service and the inference engine it drives."""
