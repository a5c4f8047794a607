"""Generated gRPC stubs for pdserve.v1 (built by `make protos`, never edited by hand)."""
