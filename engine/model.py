"""The Llama-family decoder (llama / qwen2 / mistral) over a flat batch of tokens and a paged KV cache.

One forward runs any mix of sequences: sequence i contributes `num_new[i]` query tokens at positions
`[start[i], start[i] + num_new[i])`. Their K/V are written to the cache first, then each sequence attends
to its whole K/V `[0, start + num_new)`. That single rule covers prefill (start == 0: attend to the K/V just
computed), chunked prefill (start > 0: read back from the cache blocks) and decode (num_new == 1 for every
sequence: one kernel call per layer reads each context in place through the block table, no gather).

Parameter names equal Hugging Face's (`model.layers.3.self_attn.q_proj.weight`, ...), so a safetensors
checkpoint loads by name. After loading, `CausalLM.pack_weights` fuses q/k/v and gate/up and stores every
projection as one contiguous [in, out] matrix; the named parameters become views of those (same values).
Layers are built for a range `[layer_start, layer_end)` (a pipeline stage) and, for tensor parallel rank
`tp_rank` of `tp`, with that rank's query heads, KV heads and MLP columns (`engine.parallel.layout`): q/k/v
and gate/up are column-parallel, o_proj and down_proj row-parallel, each followed by `all_reduce` (one
after attention, one after the MLP). With tp == 1 there is no reduction and nothing else changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.arena import Arena
from engine.config import ModelConfig
from engine.kernels import paged_decode_attention, rms_norm, small_matmul
from engine.kv_cache import KVCache, slots_for
from engine.parallel.layout import Layout


# --------------------------------------------------------------------------------------------------------
# Batch metadata: built once per forward, shared by every layer.
# --------------------------------------------------------------------------------------------------------
@dataclass
class BatchMeta:
    positions: Tensor  # [T] absolute position of each new token
    slot_mapping: Tensor  # [T] flat KV slot each new token's K/V is written to
    last_index: Tensor  # [N] index into T of each sequence's last new token
    num_new: list[int]  # [N] query tokens per sequence
    starts: list[int]  # [N] position of each sequence's first new token (0 = its K/V is all new)
    seq_slots: list[Tensor]  # N x [S_i] slots of seq i's whole K/V, S_i = start_i + num_new_i ([] on decode)
    seq_masks: list[Tensor | None]  # N x [num_new_i, S_i] bool (True = attend); None = plain causal
    block_table: Tensor | None  # decode only (every num_new == 1): [N, max_blocks] int64, padded with 0
    seq_lens: Tensor | None  # decode only: [N] int64 context length, the new token included
    sliding_window: int | None = None

    @property
    def is_decode(self) -> bool:
        return self.block_table is not None

    @staticmethod
    def build(
        block_tables: list[list[int]],
        starts: list[int],
        num_new: list[int],
        block_size: int,
        device: torch.device | str = "cpu",
        sliding_window: int | None = None,
    ) -> BatchMeta:
        if not block_tables or any(n <= 0 for n in num_new):
            raise ValueError(f"need >= 1 sequence with >= 1 new token each, got num_new={num_new}")
        if all(n == 1 for n in num_new):
            return BatchMeta._build_decode(block_tables, starts, block_size, device, sliding_window)
        seq_slots = [
            slots_for(b, 0, s + n, block_size) for b, s, n in zip(block_tables, starts, num_new, strict=True)
        ]
        positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, num_new, strict=True)])
        slot_mapping = torch.cat([sl[s:] for sl, s in zip(seq_slots, starts, strict=True)])
        last_index = torch.tensor(num_new).cumsum(0) - 1
        seq_masks: list[Tensor | None] = []
        for s, n in zip(starts, num_new, strict=True):
            if s == 0 and sliding_window is None:
                seq_masks.append(None)
                continue
            qpos = torch.arange(s, s + n)[:, None]  # [n, 1]
            kpos = torch.arange(s + n)[None, :]  # [1, S]
            mask = kpos <= qpos  # [n, S]
            if sliding_window is not None:
                mask &= kpos > qpos - sliding_window
            seq_masks.append(mask.to(device))
        return BatchMeta(
            positions=positions.to(device),
            slot_mapping=slot_mapping.to(device),
            last_index=last_index.to(device),
            num_new=list(num_new),
            starts=list(starts),
            seq_slots=[sl.to(device) for sl in seq_slots],
            seq_masks=seq_masks,
            block_table=None,
            seq_lens=None,
            sliding_window=sliding_window,
        )

    @staticmethod
    def _build_decode(
        block_tables: list[list[int]],
        starts: list[int],
        block_size: int,
        device: torch.device | str,
        sliding_window: int | None,
    ) -> BatchMeta:
        # one new token per sequence at position start: plain Python lists, then one tensor each
        needed = [s // block_size + 1 for s in starts]  # blocks covering positions [0, start]
        for b, s, nb in zip(block_tables, starts, needed, strict=True):
            if nb > len(b):
                raise ValueError(f"positions up to {s + 1} need {nb} blocks, sequence owns {len(b)}")
        width = max(needed)
        table = [b[:nb] + [0] * (width - nb) for b, nb in zip(block_tables, needed, strict=True)]
        slots = [
            b[s // block_size] * block_size + s % block_size
            for b, s in zip(block_tables, starts, strict=True)
        ]
        n = len(starts)
        return BatchMeta(
            positions=torch.tensor(starts, dtype=torch.long, device=device),
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            last_index=torch.arange(n, device=device),
            num_new=[1] * n,
            starts=list(starts),
            seq_slots=[],
            seq_masks=[],
            block_table=torch.tensor(table, dtype=torch.long, device=device),
            seq_lens=torch.tensor([s + 1 for s in starts], dtype=torch.long, device=device),
            sliding_window=sliding_window,
        )


# --------------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # x: [T, hidden]; normalise in fp32 like HF, scale in the model dtype
        dtype = x.dtype
        if dtype == torch.float32 and self.weight.dtype == torch.float32:
            return rms_norm(x, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


def rope_inv_freq(config: ModelConfig) -> Tensor:
    """[D/2] fp32 inverse frequencies, with llama3 / linear scaling applied (matches HF bit for bit)."""
    dim = config.head_dim
    exponent = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    inv_freq = 1.0 / (config.rope_theta**exponent)  # [D/2]
    scaling = config.rope_scaling_dict
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # llama3: long wavelengths divided by `factor`, short kept, the band in between interpolated
    old_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_len / scaling["low_freq_factor"]
    high_freq_wavelen = old_len / scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - scaling["low_freq_factor"]) / (
        scaling["high_freq_factor"] - scaling["low_freq_factor"]
    )
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding:
    """cos / sin tables for given positions. Not an nn.Module: nothing to load, safe under meta init."""

    def __init__(self, config: ModelConfig) -> None:
        self.inv_freq = rope_inv_freq(config)  # [D/2] fp32, CPU
        self._on_device: dict[torch.device, Tensor] = {}

    def __call__(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        inv_freq = self._on_device.get(positions.device)
        if inv_freq is None:
            inv_freq = self._on_device.setdefault(positions.device, self.inv_freq.to(positions.device))
        freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: [T, heads, D]; cos, sin: [T, D]
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]


def pack_linears(*linears: nn.Linear, arena: Arena | None = None) -> tuple[Tensor, Tensor | None]:
    """Store `linears` (same in_features) as one contiguous [in, sum(out)] matrix (in `arena` when given)
    plus one bias vector.

    Each linear's weight (and bias) is re-pointed at a view of the packed storage, so parameter names,
    shapes and values stay those of the checkpoint while the forward runs one `x @ w_t` instead of one
    `F.linear` per projection: fewer, wider matmuls, and the [in, out] layout is what MKL's GEMV reads
    fastest on CPU (1.7x the [out, in] layout's speed for one token on the AVX2 machines measured) and
    what `engine.kernels.small_matmul` streams.
    """
    with torch.no_grad():
        w = torch.cat([lin.weight for lin in linears])  # [out_total, in]
        w_t = w.t().contiguous() if arena is None else arena.take((w.shape[1], w.shape[0])).copy_(w.t())
        has_bias = linears[0].bias is not None
        bias = torch.cat([lin.bias for lin in linears]) if has_bias else None
    offset = 0
    for lin in linears:
        cols = slice(offset, offset + lin.out_features)
        lin.weight = nn.Parameter(w_t[:, cols].t(), requires_grad=False)  # [out, in] view
        if bias is not None:
            lin.bias = nn.Parameter(bias[cols], requires_grad=False)
        offset += lin.out_features
    return w_t, bias


def linear_t(x: Tensor, w_t: Tensor | None, bias: Tensor | None) -> Tensor:
    # x: [T, in] @ w_t: [in, out] (+ bias [out]) -> [T, out]
    if w_t is None:
        raise RuntimeError("weights are not packed: load the model with engine.loader.load_model")
    return small_matmul(x, w_t, bias)


class Attention(nn.Module):
    """GQA self-attention. `num_heads` / `num_kv_heads` are the local counts (a TP shard sets fewer)."""

    # buffers set by pack() (None until then)
    qkv_t: Tensor | None
    qkv_bias: Tensor | None
    o_t: Tensor | None
    o_bias: Tensor | None

    def __init__(self, config: ModelConfig, num_heads: int, num_kv_heads: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, config.head_dim
        d, hidden, bias = config.head_dim, config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, num_heads * d, bias=bias)
        self.k_proj = nn.Linear(hidden, num_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(hidden, num_kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(
            num_heads * d, hidden, bias=config.o_proj_bias
        )  # TP: row-parallel + all-reduce
        # set by pack(): q/k/v fused as [hidden, (H + 2 Hkv) D] and o as [H D, hidden]
        self.register_buffer("qkv_t", None, persistent=False)
        self.register_buffer("qkv_bias", None, persistent=False)
        self.register_buffer("o_t", None, persistent=False)
        self.register_buffer("o_bias", None, persistent=False)

    def pack(self, arena: Arena | None = None) -> None:
        self.qkv_t, self.qkv_bias = pack_linears(self.q_proj, self.k_proj, self.v_proj, arena=arena)
        self.o_t, self.o_bias = pack_linears(self.o_proj, arena=arena)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, meta: BatchMeta, kv_cache: KVCache, cache_layer: int
    ) -> Tensor:
        t, h, hkv, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = linear_t(x, self.qkv_t, self.qkv_bias)  # [T, (H + 2 Hkv) D]
        qk = apply_rope(qkv[:, : (h + hkv) * d].view(t, h + hkv, d), cos, sin)  # [T, H + Hkv, D], q and k
        q, k = qk[:, :h], qk[:, h:]  # [T, H, D], [T, Hkv, D]
        v = qkv[:, (h + hkv) * d :].view(t, hkv, d)  # [T, Hkv, D]
        kv_cache.write_slots(cache_layer, meta.slot_mapping, k, v)

        if meta.is_decode:
            assert meta.block_table is not None and meta.seq_lens is not None
            out = paged_decode_attention(
                q,
                kv_cache.k[cache_layer],
                kv_cache.v[cache_layer],
                meta.block_table,
                meta.seq_lens,
                meta.sliding_window,
            )  # [N, H, D], read in place from the cache blocks
        else:
            out = self._prefill_attention(q, k, v, meta, kv_cache, cache_layer)
        return linear_t(out.reshape(t, h * d), self.o_t, self.o_bias)

    def _prefill_attention(
        self, q: Tensor, k_new: Tensor, v_new: Tensor, meta: BatchMeta, kv_cache: KVCache, cache_layer: int
    ) -> Tensor:
        # one causal SDPA per sequence; query i of a sequence sits at position start + i. A sequence with
        # start == 0 attends to its new K/V as computed; one with cached tokens reads its K/V back.
        outs, offset = [], 0
        for n, start, slots, mask in zip(
            meta.num_new, meta.starts, meta.seq_slots, meta.seq_masks, strict=True
        ):
            qi = q[offset : offset + n].transpose(0, 1)[None]  # [1, H, n, D]
            if start == 0 and kv_cache.dtype == q.dtype:
                k, v = k_new[offset : offset + n], v_new[offset : offset + n]  # [n, Hkv, D]
            else:
                k, v = kv_cache.gather_slots(cache_layer, slots)  # [S, Hkv, D]
            k, v = k.transpose(0, 1)[None].to(q.dtype), v.transpose(0, 1)[None].to(q.dtype)  # [1, Hkv, S, D]
            out = F.scaled_dot_product_attention(
                qi, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True
            )
            outs.append(out[0].transpose(0, 1))  # [n, H, D]
            offset += n
        return torch.cat(outs)  # [T, H, D]


class MLP(nn.Module):
    """SwiGLU. `intermediate` is the local column count (a TP shard sets fewer)."""

    # buffers set by pack() (None until then)
    gate_up_t: Tensor | None
    down_t: Tensor | None

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.intermediate = intermediate
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)  # TP: row-parallel + all-reduce
        # set by pack(): gate/up fused as [hidden, 2 I] and down as [I, hidden]
        self.register_buffer("gate_up_t", None, persistent=False)
        self.register_buffer("down_t", None, persistent=False)

    def pack(self, arena: Arena | None = None) -> None:
        self.gate_up_t, _ = pack_linears(self.gate_proj, self.up_proj, arena=arena)
        self.down_t, _ = pack_linears(self.down_proj, arena=arena)

    def forward(self, x: Tensor) -> Tensor:
        # x: [T, hidden] -> [T, 2 I] -> [T, I] -> [T, hidden]
        gate_up = linear_t(x, self.gate_up_t, None)
        gate, up = gate_up[:, : self.intermediate], gate_up[:, self.intermediate :]
        act = F.silu(gate, inplace=True).mul_(up)  # silu(gate) * up, in gate_up's storage
        return linear_t(act, self.down_t, None)


@dataclass(frozen=True)
class Shard:
    """What TP rank `tp_rank` of `tp` holds of every layer: query heads, KV heads, MLP columns (local counts)."""

    tp: int = 1
    tp_rank: int = 0

    def heads(self, config: ModelConfig) -> tuple[int, int]:
        return Layout(self.tp).head_range(config.num_heads, self.tp_rank)

    def kv_heads(self, config: ModelConfig) -> tuple[int, int]:
        return Layout(self.tp).kv_head_range(config.num_kv_heads, self.tp_rank)

    def columns(self, config: ModelConfig) -> tuple[int, int]:
        """MLP intermediate columns [start, end) of this rank."""
        if config.intermediate_size % self.tp:
            raise ValueError(f"tp={self.tp} does not divide intermediate_size {config.intermediate_size}")
        n = config.intermediate_size // self.tp
        return self.tp_rank * n, (self.tp_rank + 1) * n


Reduce = Callable[[Tensor], Tensor]  # sums a [T, hidden] partial result over the TP group (in place)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, shard: Shard = Shard()) -> None:
        super().__init__()
        (h0, h1), (k0, k1), (c0, c1) = shard.heads(config), shard.kv_heads(config), shard.columns(config)
        self.self_attn = Attention(config, h1 - h0, k1 - k0)
        self.mlp = MLP(config.hidden_size, c1 - c0)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.all_reduce: Reduce | None = None  # set by CausalLM.set_all_reduce when tp > 1

    def forward(
        self, h: Tensor, cos: Tensor, sin: Tensor, meta: BatchMeta, kv_cache: KVCache, cache_layer: int
    ) -> Tensor:
        # h: [T, hidden]; under TP each branch yields this rank's partial sum, reduced before the residual add
        a = self.self_attn(self.input_layernorm(h), cos, sin, meta, kv_cache, cache_layer)
        h = h + (a if self.all_reduce is None else self.all_reduce(a))
        m = self.mlp(self.post_attention_layernorm(h))
        return h.add_(m if self.all_reduce is None else self.all_reduce(m))


# --------------------------------------------------------------------------------------------------------
# The model: `model.*` is the decoder stack, `lm_head` the output projection (absent when tied).
# --------------------------------------------------------------------------------------------------------
class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, layer_start: int, layer_end: int, shard: Shard = Shard()) -> None:
        super().__init__()
        self.is_first, self.is_last = layer_start == 0, layer_end == config.num_layers
        # `_weight` skips the random init, which loads nothing under meta but imported torch._dynamo (~1 s
        # of every instance's start-up): the loader fills the weights anyway
        self.embed_tokens = (
            nn.Embedding(
                config.vocab_size,
                config.hidden_size,
                _weight=torch.empty(config.vocab_size, config.hidden_size),
            )
            if self.is_first
            else None
        )
        # ModuleDict keyed by the *global* layer index keeps HF names under a pipeline layer range
        self.layers = nn.ModuleDict(
            {str(i): DecoderLayer(config, shard) for i in range(layer_start, layer_end)}
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if self.is_last else None

    def layer(self, i: int) -> DecoderLayer:
        """Decoder layer `i` (global index). `self.layers` holds only DecoderLayers; ModuleDict types its
        values as nn.Module."""
        return cast(DecoderLayer, self.layers[str(i)])


class CausalLM(nn.Module):
    """Layers [layer_start, layer_end) of a Llama-family model, TP shard `shard` of each (the embedding,
    norms and LM head are replicated). The KV cache's layer 0 is `layer_start`; it holds the shard's KV heads."""

    lm_head_t: Tensor | None  # buffer [hidden, V] set by pack_weights() when the head is untied

    def __init__(
        self, config: ModelConfig, layer_start: int = 0, layer_end: int | None = None, shard: Shard = Shard()
    ) -> None:
        super().__init__()
        layer_end = config.num_layers if layer_end is None else layer_end
        if not 0 <= layer_start < layer_end <= config.num_layers:
            raise ValueError(f"bad layer range [{layer_start}, {layer_end}) for {config.num_layers} layers")
        Layout(shard.tp).check(config.num_layers, config.num_heads, config.num_kv_heads)
        self.config, self.layer_start, self.layer_end, self.shard = config, layer_start, layer_end, shard
        self.model = LlamaModel(config, layer_start, layer_end, shard)
        # a last stage without the embedding holds its own copy of a tied head (loaded from the embedding)
        untied_head = self.model.is_last and (not config.tie_word_embeddings or not self.model.is_first)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False) if untied_head else None
        self.register_buffer("lm_head_t", None, persistent=False)  # [hidden, V], set by pack_weights()
        self.rotary = RotaryEmbedding(config)

    def pack_weights(self) -> None:
        """After loading: fuse q/k/v and gate/up and store every projection as [in, out] (see
        `pack_linears`). Parameter names and values are unchanged; they become views of the packed copies,
        which share one `Arena` (on CPU hosts that allow it, transparent huge pages: fewer TLB misses
        while a decode step streams them)."""
        linears = [
            cast(nn.Linear, lin)
            for m in self.modules()
            if isinstance(m, (Attention, MLP))
            for lin in m.children()
        ]  # Attention's and MLP's children are all nn.Linear
        linears += [self.lm_head] if self.lm_head is not None else []
        w = linears[0].weight
        arena = Arena(Arena.size_of([tuple(lin.weight.shape) for lin in linears], w.dtype), w.dtype, w.device)
        for i in range(self.layer_start, self.layer_end):
            layer = self.model.layer(i)
            layer.self_attn.pack(arena)
            layer.mlp.pack(arena)
        if self.lm_head is not None:
            self.lm_head_t, _ = pack_linears(self.lm_head, arena=arena)

    def set_all_reduce(self, reduce: Reduce) -> None:
        """The TP group's in-place sum, called after each layer's attention and MLP (tp > 1 only)."""
        for i in range(self.layer_start, self.layer_end):
            self.model.layer(i).all_reduce = reduce

    @property
    def num_local_layers(self) -> int:
        return self.layer_end - self.layer_start

    def embed(self, input_ids: Tensor) -> Tensor:
        # input_ids: [T] -> [T, hidden]
        assert self.model.embed_tokens is not None, "only the first pipeline stage embeds tokens"
        return self.model.embed_tokens(input_ids)

    @property
    def computes_layer0_kv(self) -> bool:
        """Whether `layer0_kv` can run here: this stage holds the embedding and layer 0 with all KV heads."""
        if self.layer_start != 0 or self.model.embed_tokens is None:
            return False
        return self.model.layer(0).self_attn.num_kv_heads == self.config.num_kv_heads

    def layer0_kv(self, input_ids: Tensor, rope: bool = True) -> tuple[Tensor, Tensor]:
        """Layer 0's K and V of tokens at positions 0..T-1, computed from the ids alone (embedding ->
        input RMSNorm -> K/V projection -> RoPE on K): what prefill writes into the cache for layer 0.
        input_ids: [T] int64 on the model's device -> k, v [T, Hkv, D] in the model's dtype. rope=False:
        K before RoPE (a function of the token alone, whatever its position)."""
        if not self.computes_layer0_kv:
            raise RuntimeError("layer0_kv needs the first pipeline stage with all of layer 0's KV heads")
        attn = self.model.layer(0).self_attn
        t, h, hkv, d = input_ids.shape[0], attn.num_heads, attn.num_kv_heads, attn.head_dim
        with torch.inference_mode():
            x = self.model.layer(0).input_layernorm(self.embed(input_ids))  # [T, hidden]
            assert attn.qkv_t is not None, "weights are not packed: load the model with engine.loader"
            w_kv = attn.qkv_t[:, h * d :]  # [hidden, 2 Hkv D]: K then V columns of the fused projection
            b_kv = attn.qkv_bias[h * d :] if attn.qkv_bias is not None else None
            kv = linear_t(x, w_kv, b_kv)  # [T, 2 Hkv D]
            k = kv[:, : hkv * d].view(t, hkv, d)
            if rope:
                cos, sin = self.rotary(torch.arange(t, device=input_ids.device), x.dtype)
                k = apply_rope(k, cos, sin)
            v = kv[:, hkv * d :].reshape(t, hkv, d)
        return k, v

    def run_layers(
        self, h: Tensor, meta: BatchMeta, kv_cache: KVCache, on_layer: Callable[[int], object] | None = None
    ) -> Tensor:
        """h: [T, hidden] through this stage's layers. on_layer(i) fires once layer i's K/V is in the cache."""
        cos, sin = self.rotary(meta.positions, h.dtype)  # [T, D] each
        for name, layer in self.model.layers.items():
            i = int(name)
            h = layer(h, cos, sin, meta, kv_cache, i - self.layer_start)
            if on_layer is not None:
                on_layer(i)
        return h

    def compute_logits(self, h: Tensor, last_index: Tensor) -> Tensor:
        # h: [T, hidden] -> logits of each sequence's last token: [N, V]
        assert self.model.norm is not None, "only the last pipeline stage computes logits"
        if last_index.shape[0] != h.shape[0]:  # (when T == N, as in decode, every token is a last one)
            h = h[last_index]
        h = self.model.norm(h)  # [N, hidden]
        if self.lm_head is not None:
            return linear_t(h, self.lm_head_t, None)  # [N, hidden] @ [hidden, V]
        assert self.model.embed_tokens is not None
        return h @ self.model.embed_tokens.weight.t()  # tied: [N, hidden] @ [hidden, V]

    def forward(
        self,
        input_ids: Tensor,
        meta: BatchMeta,
        kv_cache: KVCache,
        on_layer: Callable[[int], object] | None = None,
    ) -> Tensor:
        """input_ids: [T] (all sequences' new tokens, concatenated) -> logits [N, V]."""
        h = self.run_layers(self.embed(input_ids), meta, kv_cache, on_layer)
        return self.compute_logits(h, meta.last_index)
