"""Static CacheGen probability tables: one symbol distribution per (layer, K/V, channel, bins), profiled once
per model from sample KV and shipped beside it as `cachegen_tables.safetensors` (no pickle).

    .venv/bin/python -m kv_transfer.codec.cachegen_tables MODEL_DIR [--tokens 4096]   # profile, save beside

A codec finds tables three ways: passed to `CacheGenCodec(tables=...)`, installed process-wide with
`install_model(model_dir)` (what a service does after loading its model; it also tells the shared codec
the model's depth) or `install_tables()`, or, when decoding, looked up by the u64 `table_id` the encoder
wrote into params (any table loaded in this process).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kv_transfer.codec import rans
from kv_transfer.codec.cachegen_core import (
    ALLOWED_BINS,
    DEFAULT_CHUNK_TOKENS,
    LEVELS,
    Level,
    build_models,
    chunk_bounds,
    levels_of,
    pair_probs,
    quantize_keys,
    quantize_values,
    symbol_counts,
    to_streams,
)
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

    Optionally a model's bit plan (`kv_transfer.codec.cachegen_plan`): `plans[level]` = (K bins, V bins) per
    layer, which encoders of that level use instead of the level's generic shallow/deep rule, and the
    `chunk_tokens` the plan (and these tables) were made for.

    Immutable after construction; `models()` caches the constriction models it builds (thread-safe).
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
        self._models: dict[tuple[int, str, int, object], Any] = {}  # constriction models / rANS tables
        self._lock = threading.Lock()

    def has(self, layer: int, kind: str, bins: int, channels: int) -> bool:
        p = self.probs.get((layer, kind, bins))
        return p is not None and p.shape[0] == channels

    def models(self, layer: int, kind: str, bins: int, pairs: bool) -> list:
        """One constriction model per channel (over symbol pairs when `pairs`), built once and cached."""
        key = (layer, kind, bins, pairs)
        models = self._models.get(key)
        if models is None:
            p = self.probs[(layer, kind, bins)].astype(np.float64)
            models = build_models(pair_probs(p) if pairs else p)
            with self._lock:
                self._models.setdefault(key, models)
        return models

    def rans_tables(self, layer: int, kind: str, bins: int) -> rans.Tables:
        """The compiled coder's per-channel tables for (layer, kind, bins), built once and cached."""
        key = (layer, kind, bins, "rans")
        tab = self._models.get(key)
        if tab is None:
            tab = rans.tables_from_probs(self.probs[(layer, kind, bins)])
            tab.lut()  # built now, so the cached instance is never mutated while shared
            with self._lock:
                tab = self._models.setdefault(key, tab)
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


# ---- profiling --------------------------------------------------------------------------------------


def profile_tables(
    samples: Iterable[tuple[int, Tensor, Tensor]],
    num_layers: int,
    levels: Iterable[Level] | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    prior: float = 0.5,
    plans: dict[str, Plan] | None = None,
    record_chunk_tokens: bool = False,
) -> CacheGenTables:
    """Histogram the symbols the codec would produce for each (layer, K/V, channel) at every bins setting
    that one of `levels` (default: all) or of `plans` uses for that layer. samples: (layer, k [T,Hkv,D],
    v [T,Hkv,D]). `prior` is added to every count, so symbols never seen in profiling stay cheap enough.
    The tables carry `plans`, and `chunk_tokens` when `record_chunk_tokens` (encoders then default to it)."""
    levels = list(levels or LEVELS.values())
    plans = plans or {}
    counts: dict[tuple[int, str, int], np.ndarray] = {}
    for layer, k, v in samples:
        t, h, d = k.shape
        kf, vf = k.reshape(t, h * d).float(), v.reshape(t, h * d).float()
        kbins = {lv.bins(layer, num_layers)[0] for lv in levels} | {p[layer][0] for p in plans.values()}
        vbins = {lv.bins(layer, num_layers)[1] for lv in levels} | {p[layer][1] for p in plans.values()}
        for kind, x, bins_set in (("k", kf, kbins), ("v", vf, vbins)):
            for bins in sorted(bins_set):
                m = levels_of(bins)
                for a, b in chunk_bounds(t, chunk_tokens):
                    if kind == "k":
                        q = quantize_keys(x[a:b], m, torch.float32)[2]
                    else:
                        q = quantize_values(x[a:b], m)[2]
                    c = symbol_counts(to_streams(q, 2 * m + 1, pairs=False), 2 * m + 1)
                    acc = counts.setdefault((layer, kind, bins), np.zeros_like(c, dtype=np.float64))
                    if acc.shape != c.shape:
                        raise CodecError(
                            f"profile: layer {layer} has {c.shape[0]} channels, earlier {acc.shape[0]}"
                        )
                    acc += c
    return CacheGenTables(
        {key: c + prior for key, c in counts.items()},
        num_layers,
        plans,
        chunk_tokens if record_chunk_tokens else None,
    )


def profile_model(model_dir: str | Path, num_tokens: int = 4096, seq_tokens: int = 1024) -> CacheGenTables:
    """Run the model (engine.ModelRunner, CPU) over `num_tokens` tokens of its held-out text (or random
    token ids when there is none) and profile the resulting KV."""
    from engine.params import SamplingParams
    from engine.runner import ModelRunner
    from engine.sequence import Sequence

    runner = ModelRunner(str(model_dir), num_kv_blocks=-(-seq_tokens // 16), block_size=16)
    cfg = runner.config
    text_path = Path(model_dir) / "heldout.txt"
    if text_path.exists():
        ids = runner.tokenizer.encode(text_path.read_text())[:num_tokens]
    else:
        ids = torch.randint(
            0, cfg.vocab_size, (num_tokens,), generator=torch.Generator().manual_seed(0)
        ).tolist()
    seq_tokens = min(seq_tokens, runner.max_model_len - 1)
    samples: list[tuple[int, Tensor, Tensor]] = []
    for i, start in enumerate(range(0, len(ids), seq_tokens)):
        prompt = ids[start : start + seq_tokens]
        blocks = list(range(-(-len(prompt) // runner.block_size)))
        seq = Sequence(f"profile-{i}", prompt, SamplingParams(max_tokens=1), blocks=blocks)
        runner.prefill([seq])
        for layer in range(cfg.num_layers):
            k, v = runner.kv_cache.read(layer, blocks, len(prompt))
            samples.append((layer, k.float().cpu(), v.float().cpu()))
    return profile_tables(samples, cfg.num_layers)


def load_model_tables(model_dir: str | Path) -> CacheGenTables | None:
    """The tables shipped beside a model, or None if it has none."""
    path = Path(model_dir) / TABLES_FILE
    return CacheGenTables.load(path) if path.exists() else None


# ---- process-wide registry ------------------------------------------------------------------------------

_installed: CacheGenTables | None = None
_installed_num_layers: int | None = None
_by_id: dict[int, CacheGenTables] = {}
_registry_lock = threading.Lock()


def install_tables(tables: CacheGenTables | None) -> None:
    """Make `tables` the default for encoders built without tables, and decodable by id (None: uninstall
    the default; tables stay decodable)."""
    global _installed
    with _registry_lock:
        _installed = tables
        if tables is not None:
            _by_id[tables.table_id] = tables


def installed_tables() -> CacheGenTables | None:
    return _installed


def install_model(model_dir: str | Path) -> CacheGenTables | None:
    """What a service calls once after loading its model: the shared codec instance then knows the model's
    depth (which layers are shallow), uses its static tables when it ships some (returned), and its
    transform (`cachegen_klt`) when it ships one (else none is installed)."""
    global _installed_num_layers
    from engine.config import ModelConfig
    from kv_transfer.codec.cachegen_klt import install_transform, load_model_transform

    cfg = ModelConfig.from_hf_dir(model_dir)
    num_layers = cfg.num_layers
    tables = load_model_tables(model_dir)
    if tables is not None and tables.num_layers != num_layers:
        raise CodecError(
            f"{model_dir}: cachegen tables for {tables.num_layers} layers, the model has {num_layers}"
        )
    transform = load_model_transform(model_dir)
    if transform is not None and (
        transform.num_layers != num_layers or transform.channels != cfg.num_kv_heads * cfg.head_dim
    ):
        raise CodecError(f"{model_dir}: cachegen transform does not fit the model ({transform.fwd.shape})")
    with _registry_lock:
        _installed_num_layers = num_layers
    install_tables(tables)
    install_transform(transform)
    return tables


def installed_num_layers() -> int | None:
    """The depth set by install_model(), or the installed tables' depth, or None."""
    if _installed_num_layers is not None:
        return _installed_num_layers
    return _installed.num_layers if _installed is not None else None


def register_tables(tables: CacheGenTables) -> None:
    """Make `tables` decodable by id without making them the encoders' default."""
    with _registry_lock:
        _by_id[tables.table_id] = tables


def lookup_tables(table_id: int) -> CacheGenTables | None:
    return _by_id.get(table_id)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens of held-out text to profile")
    ap.add_argument("--seq-tokens", type=int, default=1024, help="tokens per profiled prompt")
    ap.add_argument("--out", type=Path, default=None, help=f"default: MODEL_DIR/{TABLES_FILE}")
    args = ap.parse_args(argv)
    tables = profile_model(args.model_dir, args.tokens, args.seq_tokens)
    out = args.out or Path(args.model_dir) / TABLES_FILE
    tables.save(out)
    print(f"wrote {out}: {len(tables.probs)} tables, id {tables.table_id:#018x}")


if __name__ == "__main__":
    main()
