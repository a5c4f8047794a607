"""KV codecs: one layer's K and V <-> (params, payload) bytes. Lookup by name via `get_codec`."""

from kv_transfer.codec.base import Codec
from kv_transfer.codec.registry import CODEC_IDS, CODECS, available_codecs, get_codec, get_codec_by_id

__all__ = ["CODECS", "CODEC_IDS", "Codec", "available_codecs", "get_codec", "get_codec_by_id"]
