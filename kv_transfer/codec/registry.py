"""The one table of codec ids and names, and lookup by name or id.

Ids are wire format: never reuse or renumber one. To add a codec, add a row to `_TABLE` pointing at
"module:Class"; modules are imported lazily, so a row whose module is not written yet simply reports
the codec as not installed (UnknownCodec) instead of breaking every import.
"""

from __future__ import annotations

import importlib
import threading

from kv_transfer.codec.base import Codec
from kv_transfer.errors import UnknownCodec

# (codec_id, name, "module:Class")
_TABLE: tuple[tuple[int, str, str], ...] = (
    (1, "raw", "kv_transfer.codec.raw:RawCodec"),
    (2, "int8", "kv_transfer.codec.int8:Int8Codec"),
    (3, "fp8", "kv_transfer.codec.fp8:Fp8Codec"),
    (4, "cachegen", "kv_transfer.codec.cachegen:CacheGenCodec"),
    (5, "cachegen_l0", "kv_transfer.codec.cachegen:CacheGenL0Codec"),
)
_BY_NAME = {name: (cid, target) for cid, name, target in _TABLE}
_BY_ID = {cid: name for cid, name, _ in _TABLE}
_instances: dict[str, Codec] = {}
_lock = threading.Lock()


def _load(name: str) -> Codec:
    cid, target = _BY_NAME[name]
    module_name, cls_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:  # the codec's module exists but one of its imports is missing
            raise UnknownCodec(f"codec {name!r} cannot be loaded: {e}") from e
        raise UnknownCodec(f"codec {name!r} (id {cid}) is reserved but not installed") from None
    codec = getattr(module, cls_name)()
    if codec.codec_id != cid or codec.name != name:
        raise RuntimeError(
            f"{target} says ({codec.codec_id}, {codec.name!r}), the table says ({cid}, {name!r})"
        )
    return codec


def get_codec(name: str) -> Codec:
    """The shared codec instance for `name`; UnknownCodec if the name is not registered or not installed."""
    codec = _instances.get(name)
    if codec is not None:
        return codec
    if name not in _BY_NAME:
        raise UnknownCodec(f"unknown codec {name!r}; known: {sorted(_BY_NAME)}")
    with _lock:
        if name not in _instances:
            _instances[name] = _load(name)
        return _instances[name]


def get_codec_by_id(codec_id: int) -> Codec:
    name = _BY_ID.get(codec_id)
    if name is None:
        raise UnknownCodec(f"unknown codec id {codec_id}")
    return get_codec(name)


def available_codecs() -> list[str]:
    """Names whose implementation imports here, in id order."""
    out = []
    for _, name, _ in _TABLE:
        try:
            get_codec(name)
        except UnknownCodec:
            continue
        out.append(name)
    return out


# Every registered name, in id order (some may be reserved but not installed: see available_codecs()).
CODECS: tuple[str, ...] = tuple(name for _, name, _ in _TABLE)
CODEC_IDS: dict[str, int] = {name: cid for cid, name, _ in _TABLE}
