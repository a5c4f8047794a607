"""Tensor and pipeline parallelism: an instance is a group of tp x pp rank processes."""
