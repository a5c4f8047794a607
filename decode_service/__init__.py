"""Decode instance: admits requests by free KV blocks, pulls their KV, streams tokens."""
