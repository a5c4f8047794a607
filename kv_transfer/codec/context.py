"""`CodecContext`: everything the codecs know about the model they serve, held as one object.

A service builds one from its model directory and its loaded model (`CodecContext.from_model_dir`) and
hands it to its `KVServer` and `KVPuller`, which get their codecs from it (`ctx.codec(name)`). It holds:
  * `num_layers`: the model's depth (CacheGen gives shallow layers more bins);
  * `tables`: `cachegen_tables.safetensors` (format v1's static tables and bit plans), or None;
  * `transform`: `cachegen_transform.safetensors` (format v5's transform and step plans), or None;
  * `layer0`: the model's layer-0 function (`cachegen_l0` sends layer 0 as the token ids), or None;
  * `rate`: `cachegen_rate.json` (format v5's rate control: size and quality by prompt length), or None;
  * `max_kl`: the quality floor the encoder spends when a frame's caller gives none (nats per token; None:
    `rate.DEFAULT_MAX_KL`, the cluster's default `--max-kl`).
`pdserve calibrate MODEL_DIR` writes the files. `CodecContext()` (no model) serves raw, int8, fp8 and
cachegen's format v1 with the generic level rules. Immutable after construction; thread-safe.
"""

from __future__ import annotations

import threading
from pathlib import Path

from kv_transfer.codec import registry
from kv_transfer.codec.base import Codec
from kv_transfer.codec.cachegen_klt import KLTransform, load_model_transform
from kv_transfer.codec.cachegen_tables import CacheGenTables, load_model_tables
from kv_transfer.codec.layer0 import Layer0
from kv_transfer.codec.rate import RateTable, load_model_rate
from kv_transfer.errors import CodecError, UnknownCodec


class CodecContext:
    def __init__(
        self,
        num_layers: int | None = None,
        tables: CacheGenTables | None = None,
        transform: KLTransform | None = None,
        layer0: Layer0 | None = None,
        rate: RateTable | None = None,
        max_kl: float | None = None,
    ) -> None:
        if max_kl is not None and not max_kl >= 0:
            raise CodecError(f"codec context max_kl must be a KL >= 0 (nats per token), got {max_kl}")
        self.num_layers, self.tables, self.transform, self.layer0 = num_layers, tables, transform, layer0
        self.rate, self.max_kl = rate, max_kl
        self._codecs: dict[str, Codec] = {}  # one instance per name, made on first use
        self._lock = threading.Lock()

    @classmethod
    def from_model_dir(
        cls, model_dir: str | Path, model=None, fingerprint: int = 0, max_kl: float | None = None
    ) -> CodecContext:
        """The context of the model in `model_dir`: its depth (config.json), the calibration files beside it
        (CodecError if they do not fit the model), and, given the loaded engine model (`CausalLM`) and its
        fingerprint, its layer-0 function where it can compute layer 0 here."""
        from engine.config import ModelConfig

        cfg = ModelConfig.from_hf_dir(model_dir)
        tables = load_model_tables(model_dir)
        if tables is not None and tables.num_layers != cfg.num_layers:
            raise CodecError(
                f"{model_dir}: cachegen tables for {tables.num_layers} layers, the model has {cfg.num_layers}"
            )
        transform = load_model_transform(model_dir)
        if transform is not None and (
            transform.num_layers != cfg.num_layers or transform.channels != cfg.num_kv_heads * cfg.head_dim
        ):
            raise CodecError(
                f"{model_dir}: cachegen transform does not fit the model ({transform.fwd.shape})"
            )
        layer0 = Layer0.from_model(model, fingerprint) if model is not None else None
        rate = load_model_rate(model_dir) if transform is not None else None
        return cls(cfg.num_layers, tables, transform, layer0, rate, max_kl)

    def codec(self, name: str) -> Codec:
        """This context's instance of codec `name`; UnknownCodec if unknown or not installed here."""
        codec = self._codecs.get(name)
        if codec is None:
            codec = registry.make_codec(name, self)
            with self._lock:
                codec = self._codecs.setdefault(name, codec)
        return codec

    def codec_by_id(self, codec_id: int) -> Codec:
        return self.codec(registry.name_of(codec_id))

    def available(self) -> list[str]:
        """Names whose implementation loads here, in id order."""
        out = []
        for name in registry.CODECS:
            try:
                self.codec(name)
            except UnknownCodec:
                continue
            out.append(name)
        return out

    def pull_codec(self, name: str) -> str:
        """The codec a decoder asks for when told `name`: cachegen with layer 0 as ids where this context can
        recompute it (it holds the model's layer-0 function), plain cachegen where it cannot."""
        if name in ("cachegen", "cachegen_l0"):
            return "cachegen_l0" if self.layer0 is not None else "cachegen"
        return name
