"""Choose the KV codec for one hand-off: the one that minimises hand-off time on this link,
among the codecs whose measured quality loss is within the request's floor (CacheGen's adaptation).

Units: bytes and seconds. A codec's profile is measured on the model (`pdserve calibrate` writes them):
`ratio` = wire bytes / raw bytes of the KV in its serving dtype, throughputs in raw bytes per second
of one core, `kl_mean` = mean per-token KL(reference || codec) in nats (0 for lossless codecs). `encode_layer_s` /
`decode_layer_s`: each side's fixed seconds per layer besides the codec (prefill: reading the layer, the
frame, the send call, the server's Python; decode: the receive, the frame's checks, writing the layer into the
KV cache), measured on a real hand-off (`python -m bench.handoff_timeline --write-profile`); 0 when not.

The hand-off is pipelined layer by layer (kv_transfer/pipeline.py): the prefill side encodes, the link
carries, the decode side decodes, all three at once on different layers, with `encode_workers` /
`decode_workers` threads coding layers in parallel. So a hand-off of `raw` bytes in L layers costs the first
layer's trip through every stage (fill and drain) plus L - 1 layers at the bottleneck's pace:
    e = raw/L / encode_bps + encode_layer_s,  s = raw/L * ratio / link_bps,  d = raw/L / decode_bps + decode_layer_s
    time = (e + s + d) + (L - 1) * max(e / encode_workers, s, d / decode_workers)
(`pipelined_handoff_s`; one layer, one core), about the slowest stage rather than their sum; without
pipelining, L * (e + s + d). With one core per process (the services' default: each side then codes one layer
at a time) the two processes still overlap each other, which is this model with one worker a side. Compression
pays only when the link is slower than the codec. The PULL's round trip and the trailer (~0.5 ms on one
host) are the same for every codec and left out.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from pdserve.errors import InvalidRequest

PROFILE_FILE = "codec_profiles.json"  # beside the model's config.json


@dataclass(frozen=True)
class CodecProfile:
    name: str
    ratio: float  # wire bytes / raw bytes, in (0, 1] for a compressor (raw = 1.0)
    encode_bps: float  # raw bytes per second per core (math.inf for a zero-cost codec)
    decode_bps: float
    kl_mean: float = 0.0  # nats per token vs the reference; 0 = lossless
    encode_layer_s: float = 0.0  # prefill side's fixed seconds per layer besides encoding (module doc)
    decode_layer_s: float = 0.0  # decode side's fixed seconds per layer besides decoding

    def handoff_s(
        self,
        raw_bytes: float,
        link_bps: float,
        num_layers: int = 1,
        pipelined: bool = True,
        encode_workers: int = 1,
        decode_workers: int = 1,
    ) -> float:
        """Seconds to move `raw_bytes` of KV over a link of `link_bps` bytes/s with this codec."""
        if not pipelined:
            n = max(1, num_layers)
            return (
                raw_bytes / self.encode_bps
                + raw_bytes * self.ratio / link_bps
                + raw_bytes / self.decode_bps
                + n * (self.encode_layer_s + self.decode_layer_s)
            )
        return pipelined_handoff_s(self, raw_bytes, link_bps, num_layers, encode_workers, decode_workers)


def pipelined_handoff_s(
    codec: CodecProfile,
    raw_bytes: float,
    link_bps: float,
    num_layers: int,
    encode_workers: int = 1,
    decode_workers: int = 1,
) -> float:
    """Seconds for a layer-pipelined hand-off (module doc): fill and drain + (L - 1) layers at the bottleneck.

    Bytes, bytes/s, seconds. `num_layers` < 1 counts as 1 (no overlap); workers < 1 count as 1."""
    n = max(1, num_layers)
    layer = raw_bytes / n
    e = layer / codec.encode_bps + codec.encode_layer_s
    s = layer * codec.ratio / link_bps
    d = layer / codec.decode_bps + codec.decode_layer_s
    bottleneck = max(e / max(1, encode_workers), s, d / max(1, decode_workers))
    return (e + s + d) + (n - 1) * bottleneck


# Conservative built-ins for when nothing was measured on this model: raw is free and exact.
DEFAULT_PROFILES: tuple[CodecProfile, ...] = (CodecProfile("raw", 1.0, math.inf, math.inf, 0.0),)


def choose_codec(
    raw_bytes: float,
    link_bps: float,
    profiles: tuple[CodecProfile, ...] | list[CodecProfile],
    max_kl: float = 0.0,
    num_layers: int = 1,
    encode_workers: int = 1,
    decode_workers: int = 1,
) -> CodecProfile:
    """The fastest admissible codec for this hand-off (pipelined model, module doc; `*_workers`: the codec
    threads each side runs, KVServer.encode_workers / KVPuller.decode_workers). `max_kl` = 0 admits lossless
    codecs only."""
    if link_bps <= 0:
        raise InvalidRequest(f"link bandwidth must be > 0 bytes/s, got {link_bps}")
    admissible = [p for p in profiles if p.kl_mean <= max_kl]
    if not admissible:
        raise InvalidRequest(
            f"no codec meets the quality floor max_kl={max_kl} (have {[p.name for p in profiles]})"
        )
    return min(
        admissible,
        key=lambda p: (
            p.handoff_s(raw_bytes, link_bps, num_layers, True, encode_workers, decode_workers),
            p.kl_mean,
        ),
    )


def break_even_bps(
    codec: CodecProfile, baseline: CodecProfile, raw_bytes: float = 2**20, num_layers: int = 1
) -> float:
    """The link bandwidth (bytes/s) below which `codec` hands off faster than `baseline`; 0 if never.

    Found by bisection on a log scale between 1 kB/s and 10 TB/s (hand-off time is monotone in it).
    """

    def gain(bps: float) -> float:
        return baseline.handoff_s(raw_bytes, bps, num_layers) - codec.handoff_s(raw_bytes, bps, num_layers)

    lo, hi = 1e3, 1e13
    if gain(lo) <= 0:
        return 0.0
    if gain(hi) > 0:
        return math.inf
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if gain(mid) > 0 else (lo, mid)
    return lo


def load_profiles(model_dir: str | Path) -> tuple[CodecProfile, ...]:
    """Profiles measured for this model (`pdserve calibrate` wrote them beside it), else the lossless default."""
    path = Path(model_dir) / PROFILE_FILE
    if not path.exists():
        return DEFAULT_PROFILES
    data = json.loads(path.read_text())
    return tuple(CodecProfile(**p) for p in data["profiles"])


def save_profiles(model_dir: str | Path, profiles: list[CodecProfile]) -> Path:
    path = Path(model_dir) / PROFILE_FILE
    path.write_text(json.dumps({"profiles": [asdict(p) for p in profiles]}, indent=2) + "\n")
    return path
