"""Coordinator: the public gateway, the router over prefill/decode pools, the Redis registry, the planner."""
