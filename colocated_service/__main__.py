"""Colocated instance: prefill and decode in one engine step loop, serving the public API (the baseline)."""

from colocated_service.server import main

main()
