"""CacheGen transform coding: a model-profiled decorrelating transform before CacheGen's quantize + entropy code.

CacheGen (the paper, LMCache) quantizes each key channel and each value token on its own range. On the shipped
model its default level (2.5 bits per element) leaves a mean per-token KL of 3.6e-3 and 94.6% top-1 agreement.
Two facts about real KV waste most of those bits (measured: docs/benchmarks.md, "KV codec"):
  * channels are strongly correlated -- within a head, and most of all for keys *before* RoPE (RoPE spins a
    key's constant offset around its frequency pair, so post-RoPE keys look noisier than they are);
  * channels differ in how much their error matters: a key error e moves attention logits by q . e, a value
    error e moves the attention output by W_o e.
So per layer this codec (format version 2 of the `cachegen` codec) codes

    keys    y = unrope(k) @ FK      values  y = v @ FV          ([T, C], C = Hkv * D, fp32)

where F = A^T U: A = M^(1/2) whitens the metric M in which the error is measured (keys: the mean query
second moment per channel of each KV head's query group, averaged over RoPE's frequency pairs; values:
W_o^T W_o of the heads reading that KV head) and U is the eigenbasis (KLT) of A x's covariance. In that
basis a uniform step is near-optimal for the weighted error (reverse water-filling: low-variance components
round to 0 and cost almost nothing), so each chunk quantizes y with ONE step per (layer, K/V) from the
level's plan, centred per component:

    q = round((y - centre_c) / step_c),  step_c = max(step, max_t |y - centre_c| / 127)  (|q| <= 127)

and entropy codes q with one two-sided geometric (discrete Laplace) model per component, parameterised by
one byte (rho: 1 - r = 2^(-rho/32)) and the component's largest |q| (its alphabet), both sent per chunk.
Tables are built from integer weights computed with IEEE multiplications only, so encoder and decoder derive
bit-identical rANS tables on every machine. The per-layer steps come from a calibration run
(`pdserve calibrate`: `calibration.transform`): each (layer, K/V) part's KL sensitivity is measured and steps are set so every
part contributes equal KL per step^2 (a_i step_i^2 = lambda), with lambda bisected to each level's budget.

ERROR BOUND (per token, L2): |y_c - y_hat_c| <= step_c / 2 for every component, so
||x - x_hat||_2 <= ||F^-1||_2 * sqrt(sum_c step_c^2) / 2 (RoPE is a rotation: the same bound holds post-RoPE),
plus fp32 arithmetic and output rounding; `error_bounds_klt` returns it per token.

The transform, its inverse, RoPE's inverse frequencies and the plans travel in `cachegen_transform.safetensors`
beside the model (a `CodecContext` loads it), identified by a u64 id in every frame; a decoder whose context
holds another transform, or none, raises FrameForeign. Keys' positions are the prompt's: token t of the layer sits at position t (prefill hands over
whole prompts).

params v2 (little-endian): `_HEADER2` | chunk directory n x `_CHUNK2` | per chunk and part (K, then V):
centre [C], step [C] (fp16, or fp32 when FLAG_WIDE), rho [C] u8, amax [C] u8 | crc32 of all before it.
payload: per chunk, K's rANS words then V's; its crc32 is in the header. Each part's symbols are coded
component-major (component c's tokens in order, then c + 1's; `rans.lap_code2`), which decodes ~1.5x faster
than token-major order.
"""

from __future__ import annotations

import functools
import hashlib
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from kv_transfer.codec import rans
from kv_transfer.codec.cachegen_core import FP16_SAFE, le_bytes, le_view, store_scale_np
from kv_transfer.errors import CodecError, FrameCorrupted, FrameForeign

TRANSFORM_FILE = "cachegen_transform.safetensors"
_FORMAT = "pdserve-cachegen-transform"
_FORMAT_VERSION = "1"
VERSION = 2  # the cachegen params version this module reads and writes
# magic, version, level id, flags, n chunks, transform id, payload crc
_HEADER2 = struct.Struct("<2sBBBIQI")
_CHUNK2 = struct.Struct("<III")  # tokens, k words, v words
_CRC = struct.Struct("<I")
FLAG_WIDE = 1  # centres and steps in fp32 (a component beyond fp16's range), else fp16
QMAX = 127  # |q| <= QMAX: symbols q + QMAX fit a byte, alphabet 255
N_SYMBOLS = 2 * QMAX + 1
_LEVEL_IDS = {"high": 1, "default": 2, "low": 3}
# The prompt's last RECENT[0] tokens are coded with steps / RECENT[1]: the first generated tokens attend to
# them most. On the shipped model (bench.codec, 128-token prompts) it lifts the share of prompts whose first
# 32 greedy tokens match from 78% to 96% for ~0.14 bits per element at 1024-token prompts (measured, see
# docs/benchmarks.md); the calibration counts these bits in each level's budget.
RECENT = (64, 8.0)
# A transform's steps may hold, beside each level, "<level>+l0": the plan for when layer 0 is not coded but
# recomputed from the token ids (`cachegen_l0`), calibrated to the same budget with layer 0 free.
L0_SUFFIX = "+l0"

# ---- discrete Laplace tables ----------------------------------------------------------------------------

_RHO_BASE = 0.9785720620877001  # 2 ** (-1 / 32) as a literal: no libm call, identical everywhere


@functools.cache
def _laplace_weights() -> np.ndarray:
    """Integer weights floor(2^20 r^m) int64 [256 rho, QMAX + 1 magnitude], 1 - r = 2^(-rho/32), from IEEE
    products only (bit-identical on every machine)."""
    w = np.zeros((256, QMAX + 1), dtype=np.int64)
    one_minus_r = 1.0
    for rho in range(256):
        r = 1.0 - one_minus_r
        p = float(1 << rans.WEIGHT_BITS)
        for m in range(QMAX + 1):
            w[rho, m] = int(p)
            p *= r
        one_minus_r *= _RHO_BASE
    return w


def laplace_tables(rho: np.ndarray, amax: np.ndarray, lut: bool = False) -> rans.Tables:
    """Per-component rANS tables over symbols q + QMAX: support [-amax_c, amax_c], weights from rho_c:
    freq = 1 + floor(w (PROB_SCALE - n) / sum w) inside the support (n = 2 amax + 1 symbols), 0 outside, the
    remainder on the largest weight (q = 0). All-integer from (rho, amax), so both ends build identical
    tables; built in C (`rans.lap_tables`), with the decode lookup when `lut`."""
    return rans.lap_tables(rho, amax, QMAX, _symbol_weights(), lut)


@functools.cache
def _symbol_weights() -> np.ndarray:
    """Weights int64 [256 rho, N_SYMBOLS] by symbol (q + QMAX)."""
    return np.ascontiguousarray(_laplace_weights()[:, np.abs(np.arange(-QMAX, QMAX + 1))])


# ---- the transform -------------------------------------------------------------------------------------


def rope_tables(inv_freq: Tensor, start: int, t: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos, sin [t, D] (fp32) for positions start..start+t-1, in the rotate-half layout the engine uses."""
    pos = torch.arange(start, start + t, dtype=torch.float32, device=device)
    freqs = pos[:, None] * inv_freq.to(device)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [t, H, D] fp32 rotated by the angles in cos/sin (pass -sin to undo). engine.model.apply_rope's twin,
    kept here so the codec does not import the engine (which compiles its kernels on import)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None, :] + torch.cat((-x2, x1), dim=-1) * sin[:, None, :]


class KLTransform:
    """Per-layer K/V transforms of one model (see the module docstring), and its per-level step plans.

    fwd/inv: float32 [L, 2 (K, V), C, C] with inv = fwd^-1; inv_freq: float32 [D/2] (RoPE of the keys);
    steps[level]: float32 [L, 2] (the uniform step of each part, in transform units). Immutable."""

    def __init__(
        self,
        fwd: np.ndarray,
        inv: np.ndarray,
        inv_freq: np.ndarray,
        num_kv_heads: int,
        steps: dict[str, np.ndarray],
        meta: dict[str, str] | None = None,
    ) -> None:
        fwd, inv = np.ascontiguousarray(fwd, np.float32), np.ascontiguousarray(inv, np.float32)
        inv_freq = np.ascontiguousarray(inv_freq, np.float32)
        if fwd.ndim != 4 or fwd.shape[1] != 2 or fwd.shape[2] != fwd.shape[3] or fwd.shape != inv.shape:
            raise CodecError(f"cachegen transform: fwd/inv must be [L, 2, C, C], got {fwd.shape}/{inv.shape}")
        layers, _, c, _ = fwd.shape
        if num_kv_heads < 1 or c % num_kv_heads or inv_freq.shape != (c // num_kv_heads // 2,):
            raise CodecError(f"cachegen transform: C={c}, {num_kv_heads} KV heads, inv_freq {inv_freq.shape}")
        if not (np.isfinite(fwd).all() and np.isfinite(inv).all() and np.isfinite(inv_freq).all()):
            raise CodecError("cachegen transform: non-finite entries")
        self.steps: dict[str, np.ndarray] = {}
        for level, s in steps.items():
            s = np.ascontiguousarray(s, np.float32)
            if (
                level.removesuffix(L0_SUFFIX) not in _LEVEL_IDS
                or s.shape != (layers, 2)
                or not (np.isfinite(s).all() and (s > 0).all())
            ):
                raise CodecError(f"cachegen transform: bad steps for level {level!r}: {s.shape}")
            self.steps[level] = s
        self.fwd, self.inv, self.inv_freq = fwd, inv, inv_freq
        self.num_layers, self.channels, self.num_kv_heads = layers, c, num_kv_heads
        self.head_dim = c // num_kv_heads
        self.meta = dict(meta or {})
        h = hashlib.blake2b(digest_size=8)
        for a in (fwd, inv, inv_freq, *(self.steps[k] for k in sorted(self.steps))):
            h.update(repr(a.shape).encode())
            h.update(a.tobytes())
        h.update(repr(sorted(self.steps)).encode())
        self.transform_id = int.from_bytes(h.digest(), "little") or 1
        self._dev: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}
        self._rope: dict[torch.device, tuple[Tensor, Tensor]] = {}  # cos, sin [P, D] for positions 0..P-1
        self._lock = threading.Lock()
        # the inverse's spectral norm per part, for the error bound
        self.inv_norm = np.linalg.norm(inv.astype(np.float64), ord=2, axis=(2, 3)).astype(np.float32)

    def covers(self, layer: int, channels: int, head_dim: int, level: str) -> bool:
        return (
            0 <= layer < self.num_layers
            and channels == self.channels
            and head_dim == self.head_dim
            and level in self.steps
        )

    def _on(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        t = self._dev.get(device)
        if t is None:
            fwd, inv, inv_freq = (torch.from_numpy(a).to(device) for a in (self.fwd, self.inv, self.inv_freq))
            with self._lock:
                t = self._dev.setdefault(device, (fwd, inv, inv_freq))
        return t

    def _cos_sin(self, t: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos, sin [P >= t, D] (contiguous) of positions 0..P-1 (cached per device, grown by doubling)."""
        got = self._rope.get(device)
        if got is None or got[0].shape[0] < t:
            n = max(t, 2 * got[0].shape[0] if got is not None else 1024)
            got = rope_tables(self._on(device)[2], 0, n, device)
            with self._lock:
                self._rope[device] = got
        return got

    def forward(self, k: Tensor, v: Tensor, layer: int) -> tuple[Tensor, Tensor]:
        """k, v [T, Hkv, D] (positions 0..T-1) -> y_k, y_v fp32 [T, C] on their device."""
        fwd = self._on(k.device)[0]
        t = k.shape[0]
        cos, sin = self._cos_sin(t, k.device)
        if k.device.type == "cpu":  # one compiled pass (torch's takes five, with temporaries)
            kf = k.float().contiguous()
            kp = torch.empty_like(kf)
            rans.rope(kf.numpy(), cos.numpy(), sin.numpy(), -1.0, kp.numpy())
        else:
            kp = _rotate(k.float(), cos[:t], -sin[:t])
        return kp.reshape(t, -1) @ fwd[layer, 0], v.float().reshape(t, -1) @ fwd[layer, 1]

    def inverse(self, yk: Tensor, yv: Tensor, layer: int) -> tuple[Tensor, Tensor]:
        """Inverse of forward: y_k, y_v fp32 [T, C] -> k, v fp32 [T, Hkv, D]."""
        inv = self._on(yk.device)[1]
        t = yk.shape[0]
        cos, sin = self._cos_sin(t, yk.device)
        k = (yk @ inv[layer, 0]).view(t, self.num_kv_heads, self.head_dim)
        if k.device.type == "cpu":
            rans.rope(k.numpy(), cos.numpy(), sin.numpy(), 1.0, k.numpy())  # in place
        else:
            k = _rotate(k, cos[:t], sin[:t])
        return k, (yv @ inv[layer, 1]).view(t, self.num_kv_heads, self.head_dim)

    # ---- files ----

    def save(self, path: str | Path) -> None:
        from safetensors.numpy import save_file

        tensors = {"fwd": self.fwd, "inv": self.inv, "inv_freq": self.inv_freq}
        tensors.update({f"steps.{k}": v for k, v in self.steps.items()})
        meta = {"format": _FORMAT, "version": _FORMAT_VERSION, "num_kv_heads": str(self.num_kv_heads)}
        meta.update({f"info.{k}": v for k, v in self.meta.items()})
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> KLTransform:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="np") as f:
                meta = f.metadata() or {}
                if meta.get("format") != _FORMAT or meta.get("version") != _FORMAT_VERSION:
                    raise CodecError(f"{path}: not a cachegen transform file (metadata {meta})")
                names = list(f.keys())
                steps = {n.split(".", 1)[1]: f.get_tensor(n) for n in names if n.startswith("steps.")}
                info = {k[5:]: v for k, v in meta.items() if k.startswith("info.")}
                return cls(
                    f.get_tensor("fwd"),
                    f.get_tensor("inv"),
                    f.get_tensor("inv_freq"),
                    int(meta["num_kv_heads"]),
                    steps,
                    info,
                )
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
            raise CodecError(f"cannot read cachegen transform {path}: {e}") from None


def load_model_transform(model_dir: str | Path) -> KLTransform | None:
    path = Path(model_dir) / TRANSFORM_FILE
    return KLTransform.load(path) if path.exists() else None


# ---- encode / decode ---------------------------------------------------------------------------------------


def _centre_step(
    mean: np.ndarray, lo: np.ndarray, hi: np.ndarray, step: float, wide: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Per-component mean, min, max fp32 [C] -> (centre, step) [C] in the stored dtype (fp32 when `wide`,
    else fp16): the mean, and the plan's step widened where max_t |y - centre| would need |q| > QMAX
    (max(hi - c, c - lo) equals it: fp32 rounding is monotone)."""
    centre = store_scale_np(mean, wide, up=False)
    c = centre.astype(np.float32)
    spread = np.maximum(hi - c, c - lo)
    return centre, store_scale_np(
        np.maximum(spread / np.float32(QMAX - 0.5), np.float32(step)), wide, up=True
    )


def _code_chunk(
    ys: tuple[Tensor, Tensor], steps: tuple[float, float], wide: bool, fused: bool = True
) -> tuple[list[np.ndarray], list[bytes]]:
    """A chunk's K and V parts y fp32 [t, C] (rows of contiguous [T, C]) -> (rANS words of each part, side
    fields per part: centre and step in the stored dtype, rho, amax). Symbols are clamp(round((y - centre)
    / step), +-QMAX) + QMAX, each component's discrete Laplace fitted to them (rans.lap_code2). CPU:
    statistics in one compiled pass per part, then quantize + fit + code both parts in one call (`fused`);
    other devices (or fused=False) quantize with torch where y lives and fit and code on the host -- the same
    bytes for the same statistics."""
    cpu = ys[0].device.type == "cpu"
    parts = []
    for y, step in zip(ys, steps, strict=True):
        if cpu:
            y = y.contiguous()
            mean, lo, hi = rans.col_stats(y.numpy())
        else:
            mean_t, (lo_t, hi_t) = y.mean(0), torch.aminmax(y, dim=0)
            mean, lo, hi = (a.cpu().numpy() for a in (mean_t, lo_t, hi_t))
        parts.append((y, *_centre_step(mean, lo, hi, step, wide)))
    cs = np.stack([c.astype(np.float32) for _, c, _ in parts])  # [2, C]
    ss = np.stack([s.astype(np.float32) for _, _, s in parts])
    if cpu and fused:
        w0, w1, rho, amax = rans.lap_encode2(
            parts[0][0].numpy(), parts[1][0].numpy(), cs, ss, QMAX, _symbol_weights()
        )
    else:
        dev = ys[0].device
        y2 = torch.stack([parts[0][0], parts[1][0]])  # [2, t, C]
        ct, sc = (torch.from_numpy(a).to(dev)[:, None, :] for a in (cs, ss))
        q = (y2 - ct).div_(sc).round_().clamp_(-QMAX, QMAX).add_(QMAX)
        sym = q.to(torch.uint8).transpose(1, 2).contiguous().cpu().numpy()  # [2, C, t]
        w0, w1, rho, amax = rans.lap_code2(sym, QMAX, _symbol_weights())
    side = []
    for i, (_, centre, st) in enumerate(parts):
        side += [le_bytes(centre), le_bytes(st), rho[i].tobytes(), amax[i].tobytes()]
    return [w0, w1], side


def encode(
    transform: KLTransform,
    level: str,
    k: Tensor,
    v: Tensor,
    layer: int,
    chunks: list[tuple[int, int]],
    steps: tuple[float, float] | None = None,
    recent: tuple[int, float] | None = None,
) -> tuple[bytes, list[np.ndarray]]:
    """k, v [T, Hkv, D] (checked by the caller) -> (params v2, rANS word arrays per chunk: K, V). The
    level's steps for `layer`, unless `steps` (K, V) overrides them (calibration). recent = (R, f): the last
    R tokens form a chunk of their own, coded with steps / f (the prompt's last tokens are read most)."""
    yk, yv = transform.forward(k, v, layer)
    lim = float(torch.stack([*torch.aminmax(yk), *torch.aminmax(yv)]).abs().max())
    if not np.isfinite(lim):
        raise CodecError("cachegen: K/V contains NaN or Inf")
    wide = lim > FP16_SAFE
    ks, vs = steps if steps is not None else (float(s) for s in transform.steps[level][layer])
    t = k.shape[0]
    recent = RECENT if recent is None else recent
    n_recent = min(recent[0], t - 1) if recent[0] > 0 and recent[1] != 1.0 else 0
    if n_recent:
        chunks = [(a, min(b, t - n_recent)) for a, b in chunks if a < t - n_recent] + [(t - n_recent, t)]
    directory, side, words = [], [], []
    for a, b in chunks:
        f = recent[1] if n_recent and a == t - n_recent else 1.0
        chunk_words, chunk_side = _code_chunk((yk[a:b], yv[a:b]), (ks / f, vs / f), wide)
        side += chunk_side
        directory.append(_CHUNK2.pack(b - a, chunk_words[0].size, chunk_words[1].size))
        words += chunk_words
    crc = 0
    for w in words:
        crc = zlib.crc32(le_view(w), crc)
    head = _HEADER2.pack(
        b"CG", VERSION, _LEVEL_IDS[level], FLAG_WIDE if wide else 0, len(chunks), transform.transform_id, crc
    )
    body = b"".join([head, *directory, *side])
    return body + _CRC.pack(zlib.crc32(body)), words


class Parsed:
    """Validated v2 params: the transform, and per chunk (start, tokens, k words, v words, [K side, V side])
    with side = (centre fp32 [C], step fp32 [C], rho u8 [C], amax u8 [C]) as numpy arrays."""

    def __init__(self, transform: KLTransform, flags: int, payload_crc: int, chunks: list) -> None:
        self.transform, self.flags, self.payload_crc, self.chunks = transform, flags, payload_crc, chunks


def parse(params: bytes, shape: tuple[int, ...], layer: int, transform: KLTransform | None) -> Parsed:
    """Check v2 params against the frame's shape and `transform` (the context's); FrameCorrupted /
    FrameForeign on anything wrong. Allocates nothing beyond the params' own size."""
    buf = params
    if len(buf) < _HEADER2.size + _CRC.size:
        raise FrameCorrupted(f"cachegen params: {len(buf)} bytes, too short")
    (crc,) = _CRC.unpack_from(buf, len(buf) - _CRC.size)
    if zlib.crc32(buf[: -_CRC.size]) != crc:
        raise FrameCorrupted("cachegen params crc32 mismatch")
    _, _, level_id, flags, n_chunks, tid, payload_crc = _HEADER2.unpack_from(buf, 0)
    t, h, d = shape
    c = h * d
    if flags & ~FLAG_WIDE or level_id not in _LEVEL_IDS.values() or not 1 <= n_chunks <= t:
        raise FrameCorrupted(f"cachegen params: flags {flags:#x}, level {level_id}, {n_chunks} chunks")
    if transform is None or transform.transform_id != tid:
        raise FrameForeign(f"cachegen: transform {tid:#018x} is not loaded in this codec context")
    if not 0 <= layer < transform.num_layers or c != transform.channels or d != transform.head_dim:
        raise FrameForeign(f"cachegen: transform {tid:#018x} does not cover layer {layer} of shape {shape}")
    sdt = np.dtype("<f4") if flags & FLAG_WIDE else np.dtype("<f2")
    part = c * (2 * sdt.itemsize + 2)
    need = _HEADER2.size + n_chunks * (_CHUNK2.size + 2 * part) + _CRC.size
    if need != len(buf):
        raise FrameCorrupted(f"cachegen params: {len(buf)} bytes, the header implies {need}")
    off, start, chunks = _HEADER2.size, 0, []
    dirs = [_CHUNK2.unpack_from(buf, off + i * _CHUNK2.size) for i in range(n_chunks)]
    off += n_chunks * _CHUNK2.size
    for tokens, kw, vw in dirs:
        if tokens < 1 or start + tokens > t:
            raise FrameCorrupted(f"cachegen params: chunk of {tokens} tokens at {start} (T = {t})")
        sides = []
        for _ in range(2):
            cs = np.frombuffer(buf, dtype=sdt, count=2 * c, offset=off).astype(np.float32)
            off += 2 * c * sdt.itemsize
            rho = np.frombuffer(buf, dtype=np.uint8, count=c, offset=off)
            amax = np.frombuffer(buf, dtype=np.uint8, count=c, offset=off + c)
            off += 2 * c
            if not np.isfinite(cs).all() or (cs[c:] <= 0).any() or (amax > QMAX).any():
                raise FrameCorrupted("cachegen params: non-finite or non-positive step, or |q| > 127")
            sides.append((cs[:c], cs[c:], rho, amax))
        chunks.append((start, tokens, kw, vw, sides))
        start += tokens
    if start != t:
        raise FrameCorrupted(f"cachegen params: chunks cover {start} tokens, the frame has {t}")
    return Parsed(transform, flags, payload_crc, chunks)


def decode(
    p: Parsed,
    words: np.ndarray,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    layer: int,
    device: torch.device,
    fused: bool = True,
) -> tuple[Tensor, Tensor]:
    """Parsed params + all payload words (uint32, sizes checked by the caller) -> k, v [T, Hkv, D]. CPU:
    tables, rANS and dequantization of a chunk in one compiled call (`fused`); other devices (or
    fused=False) decode the symbols on the host and dequantize with torch where the output lives."""
    t, h, d = shape
    ys = [torch.empty((t, h * d), dtype=torch.float32, device=device) for _ in range(2)]
    w = 0
    for start, tokens, kw, vw, sides in p.chunks:
        wk, wv = words[w : w + kw], words[w + kw : w + kw + vw]
        w += kw + vw
        rho, amax, centre, step = (np.stack([sd[i] for sd in sides]) for i in (2, 3, 0, 1))  # [2, C] each
        if device.type == "cpu" and fused:
            out = [y[start : start + tokens].numpy() for y in ys]
            rans.lap_decode2(wk, wv, rho, amax, centre, step, QMAX, _symbol_weights(), *out)
            continue
        sym = rans.lap_uncode2(wk, wv, rho, amax, tokens, QMAX, _symbol_weights())  # [2, C, t]
        q = torch.from_numpy(sym).to(device).transpose(1, 2).float().sub_(QMAX)
        c, st = (torch.from_numpy(a).to(device)[:, None, :] for a in (centre, step))
        y2 = torch.addcmul(c, q, st)  # [2, t, C]
        for y, part in zip(ys, y2, strict=True):
            y[start : start + tokens] = part

    k, v = p.transform.inverse(ys[0], ys[1], layer)
    return k.to(dtype), v.to(dtype)


def error_bounds_klt(
    params: bytes, shape: tuple[int, ...], layer: int, transform: KLTransform
) -> tuple[Tensor, Tensor]:
    """Per-token L2 bounds on ||x_t - x_hat_t|| (fp32 [T] for K, for V) implied by params, before fp32
    arithmetic and the output dtype's rounding: ||F^-1||_2 * ||step||_2 / 2 (see the module docstring)."""
    p = parse(params, shape, layer, transform)
    kb, vb = torch.empty(shape[0]), torch.empty(shape[0])
    for start, tokens, _, _, sides in p.chunks:
        for out, kind, (_, step, _, _) in zip((kb, vb), (0, 1), sides, strict=True):
            bound = (
                float(p.transform.inv_norm[layer, kind]) * float(np.linalg.norm(step.astype(np.float64))) / 2
            )
            out[start : start + tokens] = bound
    return kb, vb
