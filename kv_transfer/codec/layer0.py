"""Layer 0 from the token ids: a frame that carries the prompt's ids instead of layer 0's K and V.

Layer 0's K and V are a function of the token ids alone (embedding -> input RMSNorm -> K/V projection -> RoPE
at the token's position: `engine.model.CausalLM.layer0_kv`), so a decoder that holds the model computes them
for a few MFLOPs per token instead of receiving them. The frame costs 4 bytes per token (0.25 bits per K/V
element of a 2 x 64-channel layer) and the layer is then exact. On the shipped model layer 0 is also the layer
the CacheGen calibration gives the finest steps, about 30% of the default level's bits (docs/benchmarks.md).

The function (`Layer0`) lives in the `CodecContext` a service builds from its model, identified by an id (the
model's fingerprint) that every frame carries; a decoder without it, or with another model's, raises
FrameForeign. An encoder codes layer 0 this way only if it can check the result: its own function must
reproduce the K/V it was given (`Layer0.matches`), else the caller codes the layer as usual.

Before RoPE, a token's layer-0 K and V depend on the token id alone, so `Layer0` holds them for the whole
vocabulary (`Layer0Table`, fp32 [vocab, Hkv * D] each, computed once by the model when the context is built)
and both the check and the decode are a gather plus a rotation in C (`rans.l0_gather`): ~0.1 ms for 1024
tokens instead of a 2 ms model call. The shipped model's table is 3 MiB (6144 ids x 2 x 64 x 4 bytes; plus
0.5 MiB of RoPE tables for its 2048 positions). Where the table would pass TABLE_MAX_BYTES (a large
vocabulary: Llama-3-8B's would be 1 GiB), where the compiled coder is missing, or for a prompt longer than the
table's RoPE positions, `Layer0.mode` is "recompute": the model's function runs, as before. Both give the same
K/V within TOL (the wire format is the same); for an fp32 model the table's are prefill's bit for bit (the
rotation is the engine's arithmetic, without fused multiply-add), a 16-bit model's table rotates in fp32 where
the engine rotates in 16 bits.

params (little-endian): magic b"CG" | version u8 (= 3) | tokens u32 | model id u64 | payload crc32 u32 |
crc32 of all before it. payload: the token ids, u32 each.
"""

from __future__ import annotations

import logging
import struct
import zlib
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from kv_transfer.codec import rans
from kv_transfer.errors import FrameCorrupted, FrameForeign

VERSION = 3  # the cachegen params version of a layer-0-from-ids frame
_HEADER = struct.Struct("<2sBIQI")
_CRC = struct.Struct("<I")
PARAMS_BYTES = _HEADER.size + _CRC.size  # a layer-0 frame's params (the calibration counts them)
# |recomputed - given| <= TOL * max|given|, per K and V: fp32 reproduces prefill bit for bit here (the same
# ops); 16-bit caches may differ in the last bit where the batch shape changes the matmul's summation order
TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 1.6e-2}

Layer0Fn = Callable[[Tensor], tuple[Tensor, Tensor]]  # ids int64 [T] (CPU) -> k, v [T, Hkv, D] (post-RoPE)
TABLE_MAX_BYTES = 64 << 20  # a larger table (vocab x 2 x Hkv x D x 4 bytes) is not built: mode "recompute"
_TABLE_BATCH = 8192  # ids per model call while the table is computed

log = logging.getLogger(__name__)


class Layer0Table:
    """Layer 0 of every token id: tk (K before RoPE), tv (V), fp32 [vocab, Hkv * D], and RoPE's cos, sin fp32
    [P, D] for positions 0..P-1 (the model's own tables, so K is rotated as prefill rotates it). Immutable."""

    def __init__(self, tk: np.ndarray, tv: np.ndarray, cos: np.ndarray, sin: np.ndarray, heads: int) -> None:
        self.tk, self.tv = np.ascontiguousarray(tk, np.float32), np.ascontiguousarray(tv, np.float32)
        self.cos, self.sin = np.ascontiguousarray(cos, np.float32), np.ascontiguousarray(sin, np.float32)
        self.heads, self.head_dim = heads, self.cos.shape[1]
        self.vocab, self.positions = self.tk.shape[0], self.cos.shape[0]
        assert self.tk.shape == self.tv.shape == (self.vocab, heads * self.head_dim)

    @property
    def nbytes(self) -> int:
        return self.tk.nbytes + self.tv.nbytes + self.cos.nbytes + self.sin.nbytes

    @classmethod
    def from_model(cls, model) -> Layer0Table | None:
        """Computed by an engine CausalLM (`layer0_kv(ids, rope=False)` over the vocabulary, in batches);
        None where it would pass TABLE_MAX_BYTES or the compiled coder is missing."""
        cfg = model.config
        nbytes = cfg.vocab_size * 2 * cfg.num_kv_heads * cfg.head_dim * 4
        if nbytes > TABLE_MAX_BYTES or not rans.available():
            log.info(
                "layer 0 table of %d ids would take %.1f MiB (limit %.0f) or no compiled coder: layer 0 is "
                "recomputed by the model (mode 'recompute')", cfg.vocab_size, nbytes / 2**20,
                TABLE_MAX_BYTES / 2**20,
            )  # fmt: skip
            return None
        device = next(model.parameters()).device
        tks, tvs = [], []
        for a in range(0, cfg.vocab_size, _TABLE_BATCH):
            ids = torch.arange(a, min(a + _TABLE_BATCH, cfg.vocab_size), device=device)
            k, v = model.layer0_kv(ids, rope=False)
            tks.append(k.reshape(k.shape[0], -1).float().cpu())
            tvs.append(v.reshape(v.shape[0], -1).float().cpu())
        with torch.inference_mode():
            cos, sin = model.rotary(torch.arange(cfg.max_position_embeddings), torch.float32)
        return cls(torch.cat(tks).numpy(), torch.cat(tvs).numpy(), cos.numpy(), sin.numpy(), cfg.num_kv_heads)

    def covers(self, tokens: int, heads: int, head_dim: int) -> bool:
        return tokens <= self.positions and heads == self.heads and head_dim == self.head_dim

    def kv(
        self, ids: np.ndarray, dtype: torch.dtype = torch.float32, out: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor] | None:
        """ids uint32 [T] -> k, v [T, Hkv, D] computed in fp32, written as fp32 or (dtype fp16) rounded to fp16
        in the same pass (as `.half()` rounds), into `out` if given (contiguous, of that dtype); None if some
        id is outside the vocabulary."""
        t = ids.size
        wdt = torch.float16 if dtype == torch.float16 else torch.float32
        k, v = out if out is not None else torch.empty((2, t, self.heads, self.head_dim), dtype=wdt).unbind()
        ok = rans.l0_gather(self.tk, self.tv, ids, self.cos, self.sin, k.numpy(), v.numpy())
        return (k, v) if ok else None

    def matches(self, k: Tensor, v: Tensor, ids: np.ndarray) -> bool:
        """Whether k, v [T, Hkv, D] (CPU) are the table's layer 0 of ids uint32 [T], within TOL."""
        if k.dtype not in (torch.float16, torch.float32):  # fp16 and fp32 are read as they are
            k, v = k.float(), v.float()
        err = rans.l0_check(
            self.tk, self.tv, ids, self.cos, self.sin, k.contiguous().numpy(), v.contiguous().numpy()
        )
        if err is None:
            return False
        tol = TOL.get(k.dtype, 1e-4)
        return err[0] <= tol * max(err[1], 1e-30) and err[2] <= tol * max(err[3], 1e-30)


class Layer0:
    """A model's layer-0 function, the model's id (fingerprint), its vocabulary size and, where built, its
    per-vocabulary table (`mode` "table"; else "recompute": the function runs). Immutable; held by a
    `CodecContext`, which a service builds from the model it serves."""

    def __init__(
        self, fn: Layer0Fn, model_id: int, vocab_size: int = 0, table: Layer0Table | None = None
    ) -> None:
        if table is not None and vocab_size != table.vocab:
            raise ValueError(f"layer 0 table of {table.vocab} ids for a vocabulary of {vocab_size}")
        self.fn, self.model_id, self.vocab_size, self.table = fn, model_id, vocab_size, table

    @property
    def mode(self) -> str:
        return "table" if self.table is not None else "recompute"

    @classmethod
    def from_model(cls, model, fingerprint: int, table: bool = True) -> Layer0 | None:
        """`model.layer0_kv` of an engine CausalLM (and its table, unless `table` is False or it would be too
        large), or None if it cannot compute layer 0 here."""
        if not model.computes_layer0_kv:
            return None
        device = next(model.parameters()).device
        tab = Layer0Table.from_model(model) if table else None
        return cls(lambda ids: model.layer0_kv(ids.to(device)), fingerprint, model.config.vocab_size, tab)

    def _table_for(self, k: Tensor) -> Layer0Table | None:
        tab = self.table
        return tab if tab is not None and tab.covers(k.shape[0], k.shape[1], k.shape[2]) else None

    def matches(self, k: Tensor, v: Tensor, token_ids: Tensor) -> bool:
        """Whether this function reproduces k, v [T, Hkv, D] from token_ids [T] within TOL."""
        if token_ids.dim() != 1 or token_ids.shape[0] != k.shape[0] or k.shape != v.shape or k.dim() != 3:
            return False
        vocab = self.vocab_size
        if token_ids.numel() and (int(token_ids.min()) < 0 or (vocab and int(token_ids.max()) >= vocab)):
            return False
        tab = self._table_for(k)
        if tab is not None and k.device.type == "cpu":
            return tab.matches(k, v, _ids_u32(token_ids))
        k0, v0 = self.fn(token_ids)
        if k0.shape != k.shape or v0.shape != v.shape:
            return False
        tol = TOL.get(k.dtype, 1e-4)
        for x, x0 in ((k, k0), (v, v0)):
            x, x0 = x.float(), x0.to(x.device).float()
            if float((x - x0).abs().max()) > tol * max(float(x.abs().max()), 1e-30):
                return False
        return True

    def encode(self, token_ids: Tensor) -> tuple[bytes, bytes]:
        """-> (params, payload) of a layer-0-from-ids frame. The caller has checked `matches`."""
        payload = _ids_u32(token_ids).astype("<u4", copy=False).tobytes()
        head = _HEADER.pack(b"CG", VERSION, token_ids.shape[0], self.model_id, zlib.crc32(payload))
        return head + _CRC.pack(zlib.crc32(head)), payload


def _ids_u32(token_ids: Tensor) -> np.ndarray:
    """Token ids (checked >= 0 and < 2^32 by the caller) -> uint32 [T], C-contiguous, native order."""
    return np.ascontiguousarray(token_ids.cpu().numpy().astype(np.uint32))


def is_layer0_frame(params: bytes) -> bool:
    return len(params) > 2 and params[:2] == b"CG" and params[2] == VERSION


def _ids(params: bytes, payload: memoryview, shape: tuple[int, ...], inst: Layer0 | None) -> np.ndarray:
    """A layer-0-from-ids frame's checks (CRCs, token count, model, vocabulary) -> its ids, uint32 [T]."""
    if len(params) != PARAMS_BYTES:
        raise FrameCorrupted(f"layer-0 params: {len(params)} bytes, want {PARAMS_BYTES}")
    (crc,) = _CRC.unpack_from(params, _HEADER.size)
    if zlib.crc32(params[: _HEADER.size]) != crc:
        raise FrameCorrupted("layer-0 params: CRC mismatch")
    _, _, tokens, model_id, payload_crc = _HEADER.unpack_from(params)
    if tokens != shape[0] or len(payload) != 4 * tokens:
        raise FrameCorrupted(f"layer-0 frame: {tokens} tokens, {len(payload)} payload bytes, shape {shape}")
    if zlib.crc32(payload) != payload_crc:
        raise FrameCorrupted("layer-0 payload: CRC mismatch")
    if inst is None or inst.model_id != model_id:
        raise FrameForeign(
            f"layer-0 frame of model {model_id:#x}: this codec context has "
            + ("no layer-0 function" if inst is None else f"model {inst.model_id:#x}'s")
        )
    ids32 = np.frombuffer(payload, dtype="<u4").astype(np.uint32, copy=False)
    vocab = inst.vocab_size
    if ids32.size and vocab and int(ids32.max()) >= vocab:
        raise FrameCorrupted(f"layer-0 frame: token id {int(ids32.max())} outside the vocabulary ({vocab})")
    return np.ascontiguousarray(ids32)


def decode(
    params: bytes,
    payload: memoryview,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    inst: Layer0 | None,
) -> tuple[Tensor, Tensor]:
    """params, payload of a layer-0-from-ids frame -> k, v [T, Hkv, D] in `dtype` on `device`, computed by
    `inst` (the context's layer-0 function; FrameForeign if None or another model's)."""
    ids32 = _ids(params, payload, shape, inst)
    assert inst is not None  # _ids checked it
    tab = inst.table
    if tab is not None and len(shape) == 3 and tab.covers(shape[0], shape[1], shape[2]):
        kv = tab.kv(ids32, dtype if device.type == "cpu" else torch.float32)
        assert kv is not None  # every id was checked against the vocabulary, the table's size
        k, v = kv
    else:
        k, v = inst.fn(torch.from_numpy(ids32.astype(np.int64)))
    if tuple(k.shape) != tuple(shape) or tuple(v.shape) != tuple(shape):
        raise FrameCorrupted(f"layer-0 frame: the model computes {tuple(k.shape)}, the frame says {shape}")
    return k.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype)


def decode_into(
    params: bytes,
    payload: memoryview,
    shape: tuple[int, ...],
    inst: Layer0 | None,
    k_out: Tensor,
    v_out: Tensor,
) -> bool:
    """decode() straight into k_out, v_out [T, Hkv, D] (contiguous CPU fp16 or fp32 of `shape`) where the
    context's table covers the frame; False (nothing written) where the model's function would run."""
    ids32 = _ids(params, payload, shape, inst)
    assert inst is not None  # _ids checked it
    tab = inst.table
    if tab is None or len(shape) != 3 or not tab.covers(shape[0], shape[1], shape[2]):
        return False
    written = tab.kv(ids32, k_out.dtype, out=(k_out, v_out))
    assert written is not None  # every id was checked against the vocabulary, the table's size
    return True
