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

params v5 (little-endian): `_HEADER4` | chunk directory n x (tokens, K words, V words) u32 | centre [n, 2, C],
step [n, 2, C] (fp16, or fp32 when FLAG_WIDE) | rho [n, 2, C] u8 | amax [n, 2, C] u8 | crc32 of all before it.
payload: per chunk, K's rANS words then V's (uint16); its crc32 is in the header. Each part's symbols are coded
component-major (component c's tokens in order, then c + 1's; `rans.encode5`: 16 interleaved states per
part, token t by state t % 16). The transform writes its output component-major ([C, T]: y^T = F^T x^T), so
quantization and statistics read contiguous rows, and the decoder writes values straight into them.
Versions 2 and 4 (the same models under a 64-bit two-state coder, and a 32-bit four-state one) are retired:
such a frame is FrameForeign.
"""

from __future__ import annotations

import functools
import hashlib
import struct
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from kv_transfer.codec import rans
from kv_transfer.codec.cachegen_core import le_view
from kv_transfer.errors import CodecError, FrameCorrupted, FrameForeign

TRANSFORM_FILE = "cachegen_transform.safetensors"
_FORMAT = "pdserve-cachegen-transform"
_FORMAT_VERSION = "1"
VERSION = (
    5  # the cachegen params version this module reads and writes (v2 and v4, earlier coders, are retired)
)
# magic, version, level id, flags, n chunks, transform id, payload crc
_HEADER4 = struct.Struct("<2sBBBIQI")
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
ROW_PAD = 16  # fp32 values after each decoded row (see decode)
_WORD = np.dtype("<u2")  # payload words
_CPU = torch.device("cpu")
_LITTLE = sys.byteorder == "little"

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
    """Weights int64 [256 rho, N_SYMBOLS] by symbol (q + QMAX); checked equal to the compiled coder's own copy
    (its AVX2 table builders read that one)."""
    w = np.ascontiguousarray(_laplace_weights()[:, np.abs(np.arange(-QMAX, QMAX + 1))])
    if rans.available():
        rans.check_weights(w, QMAX)
    return w


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
        self._dev_t: dict[torch.device, tuple[Tensor, Tensor]] = {}
        # CPU: per layer, fwd^T of K and of V and inv of K and of V, each its own contiguous [C, C] tensor
        self._cpu_mats: list[tuple[Tensor, Tensor, Tensor, Tensor]] | None = None
        self._rope: dict[torch.device, tuple[Tensor, Tensor]] = {}  # cos, sin [P, D] for positions 0..P-1
        self._lock = threading.Lock()
        self._steps_of: dict[tuple[str, int], tuple[float, float]] = {}
        self._fwd_of: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._inv_of: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        # the inverse's spectral norm per part, for the error bound
        self.inv_norm = np.linalg.norm(inv.astype(np.float64), ord=2, axis=(2, 3)).astype(np.float32)

    def steps_of(self, level: str, layer: int) -> tuple[float, float]:
        """The level's (K, V) steps at `layer` as Python floats (cached: the steps are immutable)."""
        key = (level, layer)
        got = self._steps_of.get(key)
        if got is None:
            got = self._steps_of[key] = (
                float(self.steps[level][layer][0]),
                float(self.steps[level][layer][1]),
            )
        return got

    def inv_of(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """inv[layer, 0], inv[layer, 1] (K's and V's [C, C]; cached views)."""
        got = self._inv_of.get(layer)
        if got is None:
            got = self._inv_of[layer] = (self.inv[layer, 0], self.inv[layer, 1])
        return got

    def fwd_of(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """fwd[layer, 0], fwd[layer, 1] (K's and V's [C, C]; cached views)."""
        got = self._fwd_of.get(layer)
        if got is None:
            got = self._fwd_of[layer] = (self.fwd[layer, 0], self.fwd[layer, 1])
        return got

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

    def _on_t(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """fwd^T [L, 2, C, C] (contiguous) and inv on `device`."""
        got = self._dev_t.get(device)
        if got is None:
            fwd, inv, _ = self._on(device)
            got = (fwd.transpose(2, 3).contiguous(), inv)
            with self._lock:
                got = self._dev_t.setdefault(device, got)
        return got

    def _cpu(self, layer: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        mats = self._cpu_mats
        if mats is None:
            fwd_t, inv = self._on_t(torch.device("cpu"))
            mats = [
                (
                    fwd_t[i, 0].contiguous(),
                    fwd_t[i, 1].contiguous(),
                    inv[i, 0].contiguous(),
                    inv[i, 1].contiguous(),
                )
                for i in range(self.num_layers)
            ]
            self._cpu_mats = mats
        return mats[layer]

    def forward(self, k: Tensor, v: Tensor, layer: int) -> tuple[Tensor, Tensor]:
        """k, v [T, Hkv, D] (positions 0..T-1) -> y_k, y_v fp32 [C, T] (component-major, contiguous) on their
        device: y^T = F^T x^T, one matrix product per part (BLAS reads x^T as a view)."""
        t = k.shape[0]
        cos, sin = self._cos_sin(t, k.device)
        if k.device.type == "cpu":  # un-RoPE in one compiled pass (torch's takes five, with temporaries)
            fk, fv, _, _ = self._cpu(layer)
            kp = torch.empty(k.shape)
            if k.dtype == torch.float16:  # conversion and un-RoPE in one pass
                rans.rope_f16(k.contiguous(), cos, sin, -1.0, kp)
            else:
                rans.rope_t(k.float().contiguous(), cos, sin, -1.0, kp)
            return torch.mm(fk, kp.view(t, -1).T), torch.mm(fv, v.float().reshape(t, -1).T)
        fwd_t = self._on_t(k.device)[0]
        kp = _rotate(k.float(), cos[:t], -sin[:t])
        return fwd_t[layer, 0] @ kp.reshape(t, -1).T, fwd_t[layer, 1] @ v.float().reshape(t, -1).T

    def inverse(
        self, yk: Tensor, yv: Tensor, layer: int, dtype: torch.dtype = torch.float32
    ) -> tuple[Tensor, Tensor]:
        """Inverse of forward: y_k, y_v fp32 [C, T] -> k, v [T, Hkv, D] in `dtype` (computed in fp32)."""
        t = yk.shape[1]
        cos, sin = self._cos_sin(t, yk.device)
        shape = (t, self.num_kv_heads, self.head_dim)
        if yk.device.type == "cpu":
            _, _, gk, gv = self._cpu(layer)
            k = torch.mm(yk.T, gk).view(shape)
            if dtype == torch.float16:  # RoPE and conversion in one pass
                k16 = torch.empty(shape, dtype=dtype)
                rans.rope_f16(k, cos, sin, 1.0, k16)
                k = k16
            else:
                rans.rope_t(k, cos, sin, 1.0, k)  # in place
            return k.to(dtype), torch.mm(yv.T, gv).view(shape).to(dtype)
        inv = self._on_t(yk.device)[1]
        k = _rotate((yk.T @ inv[layer, 0]).view(shape), cos[:t], sin[:t])
        return k.to(dtype), (yv.T @ inv[layer, 1]).view(shape).to(dtype)

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


def _stats_torch(yk: Tensor, yv: Tensor, bounds: list[int]) -> np.ndarray:
    """stats4 computed with torch where y lives (a CUDA encoder reads back only these [nch, 2, 3, C])."""
    rows = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        for y in (yk, yv):
            part = y[:, a:b]
            rows.append(torch.stack([part.mean(1), *torch.aminmax(part, dim=1)]))
    st = torch.stack(rows).view(len(bounds) - 1, 2, 3, -1).cpu().numpy()
    if not np.isfinite(st).all():
        raise CodecError("cachegen: K/V contains NaN or Inf")
    return st


def quantize_torch(yk: Tensor, yv: Tensor, bounds: list[int], centre: np.ndarray, step: np.ndarray) -> Tensor:
    """The C encoder's quantizer in torch, where y lives: y [C, T] fp32 -> symbols uint8, chunk j's [2, C, len_j]
    back to back (the layout `rans.code5` reads): clamp(round((y - centre) * (1 / step)), -QMAX, QMAX) + QMAX,
    the same IEEE fp32 operations as the C loop, so the same symbols."""
    dev = yk.device
    ct = torch.from_numpy(np.ascontiguousarray(centre, np.float32)).to(dev)
    inv = torch.from_numpy(np.float32(1.0) / np.ascontiguousarray(step, np.float32)).to(dev)
    out = []
    for j, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        y2 = torch.stack([yk[:, a:b], yv[:, a:b]])  # [2, C, len]
        q = (y2 - ct[j][:, :, None]).mul_(inv[j][:, :, None]).round_().clamp_(-QMAX, QMAX).add_(QMAX)
        out.append(q.to(torch.uint8).reshape(-1))
    return torch.cat(out)


class _ChunkPlan:
    """A frame's chunking and steps for (t, chunks, (K, V) steps, recent, scale), as `encode` codes them: the
    recent chunk split off, bounds int64 [nch + 1], plan fp32 [nch, 2] (read-only: shared by every frame of that
    shape and setting), each chunk's length."""

    __slots__ = ("chunks", "bounds", "plan", "lengths")

    def __init__(
        self, t: int, chunks: list[tuple[int, int]], steps: tuple[float, float], recent: tuple[int, float],
        scale: float,
    ) -> None:  # fmt: skip
        ks, vs = steps[0] * scale, steps[1] * scale
        n_recent = min(recent[0], t - 1) if recent[0] > 0 and recent[1] != 1.0 else 0
        if n_recent:
            chunks = [(a, min(b, t - n_recent)) for a, b in chunks if a < t - n_recent] + [(t - n_recent, t)]
        steps_of = [(ks, vs)] * len(chunks)
        if n_recent:
            steps_of[-1] = (ks / recent[1], vs / recent[1])
        self.chunks = list(chunks)
        self.bounds = np.array([a for a, _ in chunks] + [t], np.int64)
        self.plan = np.array(steps_of, np.float32)
        self.lengths = np.diff(self.bounds).astype(np.uint32)
        for a in (self.bounds, self.plan, self.lengths):
            a.setflags(write=False)


_chunk_plans: dict[tuple, _ChunkPlan] = {}  # encode's, by (t, chunks, steps, recent, scale)


def encode(
    transform: KLTransform,
    level: str,
    k: Tensor,
    v: Tensor,
    layer: int,
    chunks: list[tuple[int, int]],
    steps: tuple[float, float] | None = None,
    recent: tuple[int, float] | None = None,
    scale: float = 1.0,
    fused: bool = True,
) -> tuple[bytes, list[np.ndarray]]:
    """k, v [T, Hkv, D] (checked by the caller) -> (params v5, [payload words uint16]). The level's steps for
    `layer`, or `steps` (K, V) where given, times `scale` (rate control). recent = (R, f):
    the last R tokens form a chunk of their own, coded with steps / f (the prompt's last tokens are read
    most). CPU (`fused`): one compiled call (`rans.encode5_kv`: un-RoPE, the transform's products, statistics,
    side information, quantize, fit, code); other devices (or fused=False) compute the statistics and the symbols with torch where k lives (only they cross
    to the host) and fit and code on the host -- the same bytes for the same statistics."""
    t = k.shape[0]
    if steps is None:
        steps = transform.steps_of(level, layer)
    key = (t, tuple(chunks), steps, recent, scale)
    cp = _chunk_plans.get(key)
    if cp is None:
        cp = _ChunkPlan(t, chunks, steps, RECENT if recent is None else recent, scale)
        if len(_chunk_plans) > 4096:  # lengths x settings seen: bounded
            _chunk_plans.clear()
        _chunk_plans[key] = cp
    chunks, bounds, plan = cp.chunks, cp.bounds, cp.plan
    wsym = _symbol_weights()
    if k.device.type == "cpu" and fused:  # transform, statistics, side, quantize, fit, code: one call
        if k.dtype not in (torch.float16, torch.float32):
            k, v = k.float(), v.float()
        cos, sin = transform._cos_sin(t, k.device)
        fk, fv = transform.fwd_of(layer)
        side, words, nw, rho, amax, crc = rans.encode5_kv(
            k.contiguous(), v.contiguous(), fk, fv, cos, sin, bounds, plan, QMAX, wsym
        )
    else:
        yk, yv = transform.forward(k, v, layer)  # [C, T] each
        side = rans.side5(_stats_torch(yk, yv, bounds.tolist()), plan, QMAX)
        sym = quantize_torch(yk, yv, bounds.tolist(), side.centre, side.step).cpu().numpy()
        words, nw, rho, amax = rans.code5(sym, transform.channels, bounds, QMAX, wsym)
        crc = -1
    head = _HEADER4.pack(
        b"CG", VERSION, _LEVEL_IDS[level], FLAG_WIDE if side.wide else 0, len(chunks), transform.transform_id,
        crc if crc >= 0 and _LITTLE else zlib.crc32(le_view(words)),
    )  # fmt: skip
    directory = np.empty((len(chunks), 3), "<u4")  # (tokens, K words, V words) per chunk
    directory[:, 0] = cp.lengths
    directory[:, 1:] = nw
    body = b"".join([head, directory.data, side.data.data, rho.data, amax.data])
    return body + _CRC.pack(zlib.crc32(body)), [words]


class Parsed:
    """Validated v5 params (`params`: their bytes): the transform, chunk bounds int64 [nch + 1], word counts nw int64 [nch, 2] (and
    their sum, `words`), and centre, step fp32 / rho, amax uint8 [nch, 2, C]."""

    def __init__(
        self,
        transform: KLTransform,
        flags: int,
        payload_crc: int,
        bounds: np.ndarray,
        nw: np.ndarray,
        side: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
        words: int,
        params: bytes,
    ) -> None:
        self.transform, self.flags, self.payload_crc, self.params = transform, flags, payload_crc, params
        self.bounds, self.nw, self.words = bounds, nw, words
        self.centre, self.step, self.rho, self.amax = side


def parse(params: bytes, shape: tuple[int, ...], layer: int, transform: KLTransform | None) -> Parsed:
    """Check v5 params against the frame's shape and `transform` (the context's); FrameCorrupted /
    FrameForeign on anything wrong. Allocates nothing beyond the params' own size."""
    n, flags, payload_crc, transform = _check_header(params, shape, layer, transform)
    buf, t, c = params, shape[0], shape[1] * shape[2]
    sdt = np.dtype("<f4") if flags & FLAG_WIDE else np.dtype("<f2")
    off = _HEADER4.size
    bounds, nw, centre, step, words = rans.parse_side5(
        buf[off : len(buf) - _CRC.size], n, c, t, bool(flags & FLAG_WIDE), QMAX
    )
    off += 12 * n + 2 * n * 2 * c * sdt.itemsize
    rho = np.frombuffer(buf, np.uint8, n * 2 * c, off).reshape(n, 2, c)
    amax = np.frombuffer(buf, np.uint8, n * 2 * c, off + n * 2 * c).reshape(n, 2, c)
    return Parsed(transform, flags, payload_crc, bounds, nw, (centre, step, rho, amax), words, bytes(buf))


def _check_header(
    buf: bytes, shape: tuple[int, ...], layer: int, transform: KLTransform | None
) -> tuple[int, int, int, KLTransform]:
    """v5 params' CRC, header and length against the frame's shape and `transform` -> (chunks, flags, payload
    crc, transform). FrameCorrupted / FrameForeign as parse."""
    if len(buf) < _HEADER4.size + _CRC.size:
        raise FrameCorrupted(f"cachegen params: {len(buf)} bytes, too short")
    (crc,) = _CRC.unpack_from(buf, len(buf) - _CRC.size)
    if zlib.crc32(buf[: -_CRC.size]) != crc:
        raise FrameCorrupted("cachegen params crc32 mismatch")
    _, _, level_id, flags, n, tid, payload_crc = _HEADER4.unpack_from(buf, 0)
    t, h, d = shape
    c = h * d
    if flags & ~FLAG_WIDE or level_id not in _LEVEL_IDS.values() or not 1 <= n <= t:
        raise FrameCorrupted(f"cachegen params: flags {flags:#x}, level {level_id}, {n} chunks")
    if transform is None or transform.transform_id != tid:
        raise FrameForeign(f"cachegen: transform {tid:#018x} is not loaded in this codec context")
    if not 0 <= layer < transform.num_layers or c != transform.channels or d != transform.head_dim:
        raise FrameForeign(f"cachegen: transform {tid:#018x} does not cover layer {layer} of shape {shape}")
    side_bytes = 4 if flags & FLAG_WIDE else 2  # centre and step: fp32 or fp16
    need = _HEADER4.size + n * 12 + n * 2 * c * (2 * side_bytes + 2) + _CRC.size
    if need != len(buf):
        raise FrameCorrupted(f"cachegen params: {len(buf)} bytes, the header implies {need}")
    return n, flags, payload_crc, transform


def decode(
    p: Parsed,
    words: np.ndarray,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    layer: int,
    device: torch.device,
    fused: bool = True,
) -> tuple[Tensor, Tensor]:
    """Parsed params + all payload words (uint16, count checked by the caller) -> k, v [T, Hkv, D]. CPU:
    tables, rANS, dequantization, the inverse transform, RoPE and fp16 in one compiled call (`fused`:
    `rans.decode5_kv`; the codec's own CPU decoder is `decode_cpu`, which skips this Parsed); other devices (or
    fused=False) decode the symbols on the host and dequantize with torch where the output lives."""
    t, h, d = shape
    c = h * d
    if device.type == "cpu" and fused:
        return _decode_kv(p.params, len(p.bounds) - 1, p.flags, p.transform, words, shape, dtype, layer, -1)
    else:
        sym = torch.from_numpy(rans.uncode5(words, p.nw, p.rho, p.amax, p.bounds, QMAX, _symbol_weights()))
        sym = sym.to(device)
        ct, st = (torch.from_numpy(a).to(device) for a in (p.centre, p.step))
        ys = torch.empty((2, c, t), device=device)
        for j in range(len(p.bounds) - 1):
            a, b = int(p.bounds[j]), int(p.bounds[j + 1])
            q = sym[2 * c * a : 2 * c * b].view(2, c, b - a).float().sub_(QMAX)
            ys[:, :, a:b] = torch.addcmul(ct[j][:, :, None], q, st[j][:, :, None])
        yk, yv = ys[0], ys[1]
    return p.transform.inverse(yk, yv, layer, dtype)


def decode_cpu(
    params: bytes, pay: memoryview, shape: tuple[int, ...], dtype: torch.dtype, layer: int,
    transform: KLTransform | None, out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The CPU decoder of a v5 frame (params, payload bytes) in one compiled call after the header's and the
    CRCs' checks: directory and side information (checked as `parse` checks them), rANS, dequantization, the
    inverse transform, RoPE and the output dtype (fp16 or fp32; others converted after), into `out` if given
    (contiguous [T, Hkv, D] of `dtype`, fp16 or fp32: written only once every check passed). FrameCorrupted /
    FrameForeign as parse; FrameCorrupted if the payload is not the directory's word count."""
    n, flags, payload_crc, transform = _check_header(params, shape, layer, transform)
    if not _LITTLE and zlib.crc32(pay) != payload_crc:  # else the compiled call checks it on the wire's bytes
        raise FrameCorrupted("cachegen payload crc32 mismatch")
    if len(pay) % 2:
        raise FrameCorrupted(f"cachegen payload: {len(pay)} bytes, not whole words")
    words = np.frombuffer(pay, _WORD)
    if not (_LITTLE and words.flags.aligned):
        words = words.astype(np.uint16)
    return _decode_kv(
        params, n, flags, transform, words, shape, dtype, layer, payload_crc if _LITTLE else -1, out
    )


def _decode_kv(
    params: bytes, n: int, flags: int, transform: KLTransform, words: np.ndarray, shape: tuple[int, ...],
    dtype: torch.dtype, layer: int, crc: int, out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """params' directory and side information (header checked) + the payload's words -> k, v on the CPU, in
    one compiled call (`rans.decode5_kv`: it checks the words' CRC-32 against `crc` where that is >= 0; the
    decoded rows are ROW_PAD-padded there)."""
    t = shape[0]
    wdt = torch.float16 if dtype == torch.float16 else torch.float32
    if out is not None and out[0].dtype != wdt:
        raise ValueError(f"decode into {out[0].dtype}: the compiled decoder writes fp16 or fp32")
    k, v = out if out is not None else torch.empty((2, *shape), dtype=wdt).unbind()  # each contiguous
    cos, sin = transform._cos_sin(t, _CPU)
    gk, gv = transform.inv_of(layer)
    rans.decode5_kv(
        params[_HEADER4.size : len(params) - _CRC.size], n, t, bool(flags & FLAG_WIDE), QMAX, words,
        _symbol_weights(), gk, gv, cos, sin, k, v, crc=crc,
    )  # fmt: skip
    return (k, v) if wdt == dtype else (k.to(dtype), v.to(dtype))


def error_bounds_klt(
    params: bytes, shape: tuple[int, ...], layer: int, transform: KLTransform
) -> tuple[Tensor, Tensor]:
    """Per-token L2 bounds on ||x_t - x_hat_t|| (fp32 [T] for K, for V) implied by params, before fp32
    arithmetic and the output dtype's rounding: ||F^-1||_2 * ||step||_2 / 2 (see the module docstring)."""
    p = parse(params, shape, layer, transform)
    kb, vb = torch.empty(shape[0]), torch.empty(shape[0])
    norms = np.linalg.norm(p.step.astype(np.float64), axis=2)  # [nch, 2]
    for j in range(len(p.bounds) - 1):
        a, b = int(p.bounds[j]), int(p.bounds[j + 1])
        for out, kind in ((kb, 0), (vb, 1)):
            out[a:b] = float(p.transform.inv_norm[layer, kind]) * float(norms[j, kind]) / 2
    return kb, vb
