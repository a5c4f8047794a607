"""Prefill instance: computes prompts' KV caches and holds them under a lease for decode to pull."""
