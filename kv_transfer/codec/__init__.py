"""KV codecs: one layer's K and V <-> (params, payload) bytes. A `CodecContext` (the model's calibration)
makes the instances: `CodecContext.from_model_dir(...).codec(name)`."""

from kv_transfer.codec.base import Codec
from kv_transfer.codec.context import CodecContext
from kv_transfer.codec.registry import CODEC_IDS, CODECS

__all__ = ["CODECS", "CODEC_IDS", "Codec", "CodecContext"]
