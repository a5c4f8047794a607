"""Colocated instance: prefill and decode in one engine step loop, serving the public API (the baseline)."""
