"""kv_transfer: the KV data plane between prefill and decode (frames, codecs, transports, pull server/client).

gRPC is never used for KV bytes. See docs/design.md ("kv_transfer/") for the contract.

Import from the submodules (`kv_transfer.server.KVServer`, `kv_transfer.client.KVPuller`, ...): this package
imports nothing itself, so the coordinator can read `kv_transfer.choice` without loading torch.
"""
