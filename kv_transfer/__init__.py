"""kv_transfer: the KV data plane between prefill and decode (frames, codecs, transports, pull server/client).

gRPC is never used for KV bytes. See docs/design.md ("kv_transfer/") for the contract.
"""

from kv_transfer.client import KVPuller, PullHandle, PullState, PullStats, Trailer
from kv_transfer.codec import CODECS, Codec, available_codecs, get_codec
from kv_transfer.frame import Frame, decode_frame, encode_frame
from kv_transfer.server import KVServer
from kv_transfer.transport import Channel, Listener, Transport, available_transports, transport_for

__all__ = [
    "CODECS",
    "Channel",
    "Codec",
    "Frame",
    "KVPuller",
    "KVServer",
    "Listener",
    "PullHandle",
    "PullState",
    "PullStats",
    "Trailer",
    "Transport",
    "available_codecs",
    "available_transports",
    "decode_frame",
    "encode_frame",
    "get_codec",
    "transport_for",
]
