"""The one table of codec ids and names.

Ids are wire format: never reuse or renumber one. To add a codec, add a row to `TABLE` pointing at
"module:Class"; modules are imported lazily, so a row whose module (or one of its prerequisites, such as
cachegen's compiled coder) is missing reports the codec as not installed (UnknownCodec) instead of breaking
every import. Instances are made by a `CodecContext` (kv_transfer.codec.context), which passes itself to
codecs whose class takes the model's calibration (`uses_context`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from kv_transfer.errors import UnknownCodec

if TYPE_CHECKING:
    from kv_transfer.codec.base import Codec
    from kv_transfer.codec.context import CodecContext

# (codec_id, name, "module:Class")
TABLE: tuple[tuple[int, str, str], ...] = (
    (1, "raw", "kv_transfer.codec.raw:RawCodec"),
    (2, "int8", "kv_transfer.codec.int8:Int8Codec"),
    (3, "fp8", "kv_transfer.codec.fp8:Fp8Codec"),
    (4, "cachegen", "kv_transfer.codec.cachegen:CacheGenCodec"),
    (5, "cachegen_l0", "kv_transfer.codec.cachegen:CacheGenL0Codec"),
)
_BY_NAME = {name: (cid, target) for cid, name, target in TABLE}
_BY_ID = {cid: name for cid, name, _ in TABLE}

# Every registered name, in id order (some may be reserved but not installed: see CodecContext.available()).
CODECS: tuple[str, ...] = tuple(name for _, name, _ in TABLE)
CODEC_IDS: dict[str, int] = {name: cid for cid, name, _ in TABLE}


def name_of(codec_id: int) -> str:
    name = _BY_ID.get(codec_id)
    if name is None:
        raise UnknownCodec(f"unknown codec id {codec_id}")
    return name


def make_codec(name: str, ctx: CodecContext) -> Codec:
    """A new instance of codec `name` (bound to `ctx` if it takes one); UnknownCodec if the name is not
    registered or the codec is not installed here."""
    if name not in _BY_NAME:
        raise UnknownCodec(f"unknown codec {name!r}; known: {sorted(_BY_NAME)}")
    cid, target = _BY_NAME[name]
    module_name, cls_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:  # the codec's module exists but one of its imports is missing
            raise UnknownCodec(f"codec {name!r} cannot be loaded: {e}") from e
        raise UnknownCodec(f"codec {name!r} (id {cid}) is reserved but not installed") from None
    cls = getattr(module, cls_name)
    codec = cls(ctx) if getattr(cls, "uses_context", False) else cls()
    if codec.codec_id != cid or codec.name != name:
        raise RuntimeError(
            f"{target} says ({codec.codec_id}, {codec.name!r}), the table says ({cid}, {name!r})"
        )
    return codec
