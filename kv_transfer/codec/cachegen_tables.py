"""Static CacheGen probability tables (format v1): one symbol distribution per (layer, K/V, channel, bins),
profiled once per model from sample KV (`pdserve calibrate`, `calibration.plan`) and shipped beside it as
`cachegen_tables.safetensors` (no pickle), with the model's bit plans. A `CodecContext` holds a model's
tables; frames name them by the u64 `table_id` the encoder wrote into params.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import numpy as np

from kv_transfer.codec import rans
from kv_transfer.codec.cachegen_core import ALLOWED_BINS, LEVELS, levels_of
from kv_transfer.errors import CodecError

TABLES_FILE = "cachegen_tables.safetensors"
_FORMAT = "pdserve-cachegen-tables"
_FORMAT_VERSION = "1"
KINDS = ("k", "v")


def _key(layer: int, kind: str, bins: int) -> str:
    return f"L{layer}.{kind}.b{bins}"


Plan = tuple[tuple[int, int], ...]  # (K bins, V bins) per layer


class CacheGenTables:
    """probs[(layer, kind, bins)] = float32 [C, 2M+1] unnormalised symbol probabilities (e.g. smoothed counts).

    Optionally a model's bit plan (`calibration.plan`): `plans[level]` = (K bins, V bins) per
    layer, which encoders of that level use instead of the level's generic shallow/deep rule, and the
    `chunk_tokens` the plan (and these tables) were made for.

    Immutable after construction; `rans_tables()` caches the coder tables it builds (thread-safe).
    `table_id` hashes the arrays as stored, so a saved and reloaded table keeps its id.
    """

    def __init__(
        self,
        probs: dict[tuple[int, str, int], np.ndarray],
        num_layers: int,
        plans: dict[str, Plan] | None = None,
        chunk_tokens: int | None = None,
    ) -> None:
        if num_layers < 1:
            raise CodecError(f"cachegen tables: num_layers {num_layers} < 1")
        self.plans: dict[str, Plan] = {}
        for level, plan in (plans or {}).items():
            plan = tuple((int(kb), int(vb)) for kb, vb in plan)
            if (
                level not in LEVELS
                or len(plan) != num_layers
                or any(b not in ALLOWED_BINS for pair in plan for b in pair)
            ):
                raise CodecError(f"cachegen tables: bad plan for level {level!r}: {plan}")
            self.plans[level] = plan
        if chunk_tokens is not None and not 2 <= chunk_tokens < 1 << 31:
            raise CodecError(f"cachegen tables: chunk_tokens {chunk_tokens} out of range")
        self.chunk_tokens = chunk_tokens
        clean: dict[tuple[int, str, int], np.ndarray] = {}
        for (layer, kind, bins), p in sorted(probs.items()):
            p = np.ascontiguousarray(p, dtype=np.float32)
            n = 2 * levels_of(bins) + 1
            ok = kind in KINDS and 0 <= layer < num_layers and p.ndim == 2 and p.shape[1] == n
            if not ok or not np.isfinite(p).all() or (p < 0).any() or (p.sum(1) <= 0).any():
                raise CodecError(f"cachegen tables: bad table {_key(layer, kind, bins)} shape {p.shape}")
            clean[(layer, kind, bins)] = p
        self.probs = clean
        self.num_layers = num_layers
        h = hashlib.blake2b(digest_size=8)
        h.update(str(num_layers).encode())
        for key, p in clean.items():
            h.update(repr((key, p.shape)).encode())
            h.update(p.tobytes())
        self.table_id = int.from_bytes(h.digest(), "little") or 1  # 0 means "no table" on the wire
        self._rans: dict[tuple[int, str, int], rans.Tables] = {}
        self._lock = threading.Lock()

    def has(self, layer: int, kind: str, bins: int, channels: int) -> bool:
        p = self.probs.get((layer, kind, bins))
        return p is not None and p.shape[0] == channels

    def rans_tables(self, layer: int, kind: str, bins: int) -> rans.Tables:
        """The compiled coder's per-channel tables for (layer, kind, bins), built once and cached."""
        key = (layer, kind, bins)
        tab = self._rans.get(key)
        if tab is None:
            tab = rans.tables_from_probs(self.probs[(layer, kind, bins)])
            tab.lut()  # built now, so the cached instance is never mutated while shared
            with self._lock:
                tab = self._rans.setdefault(key, tab)
        return tab

    def save(self, path: str | Path) -> None:
        from safetensors.numpy import save_file

        tensors = {_key(*key): p for key, p in self.probs.items()}
        meta = {"format": _FORMAT, "version": _FORMAT_VERSION, "num_layers": str(self.num_layers)}
        if self.plans:
            meta["plans"] = json.dumps({lv: [list(b) for b in plan] for lv, plan in self.plans.items()})
        if self.chunk_tokens is not None:
            meta["chunk_tokens"] = str(self.chunk_tokens)
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> CacheGenTables:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="np") as f:
                meta = f.metadata() or {}
                if meta.get("format") != _FORMAT or meta.get("version") != _FORMAT_VERSION:
                    raise CodecError(f"{path}: not a cachegen table file (metadata {meta})")
                probs = {}
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    layer, kind, bins = name.split(".")
                    probs[(int(layer[1:]), kind, int(bins[1:]))] = f.get_tensor(name)
                num_layers = int(meta["num_layers"])
                plans = json.loads(meta["plans"]) if "plans" in meta else None
                chunk = int(meta["chunk_tokens"]) if "chunk_tokens" in meta else None
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
            raise CodecError(f"cannot read cachegen tables {path}: {e}") from None
        if plans is not None and not isinstance(plans, dict):
            raise CodecError(f"cannot read cachegen tables {path}: plans is not a mapping")
        return cls(probs, num_layers, plans, chunk)


def load_model_tables(model_dir: str | Path) -> CacheGenTables | None:
    """The tables shipped beside a model, or None if it has none."""
    path = Path(model_dir) / TABLES_FILE
    return CacheGenTables.load(path) if path.exists() else None
