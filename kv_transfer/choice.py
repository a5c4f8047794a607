"""Choose the KV codec for one hand-off: the one that minimises hand-off time on this link,
among the codecs whose measured quality loss is within the request's floor (CacheGen's adaptation).

Units: bytes and seconds. A codec's profile is measured on the model (`pdserve calibrate` writes them):
`ratio` = wire bytes / raw bytes of the KV in its serving dtype, throughputs in raw bytes per second
of one core, `kl_mean` = mean per-token KL(reference || codec) in nats (0 for lossless codecs).

With layer-wise pipelining the three stages overlap, so a hand-off of `raw` bytes costs about
    max(raw / encode_bps, raw * ratio / link_bps, raw / decode_bps) + one layer's worth of fill,
and without pipelining their sum. Compression pays only when the link is slower than the codec.
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

    def handoff_s(
        self, raw_bytes: float, link_bps: float, num_layers: int = 1, pipelined: bool = True
    ) -> float:
        """Seconds to move `raw_bytes` of KV over a link of `link_bps` bytes/s with this codec."""
        stages = (raw_bytes / self.encode_bps, raw_bytes * self.ratio / link_bps, raw_bytes / self.decode_bps)
        if not pipelined:
            return sum(stages)
        fill = sum(stages) / max(1, num_layers)  # the first layer passes every stage before overlap starts
        return max(stages) + fill - max(stages) / max(1, num_layers)


# Conservative built-ins for when nothing was measured on this model: raw is free and exact.
DEFAULT_PROFILES: tuple[CodecProfile, ...] = (CodecProfile("raw", 1.0, math.inf, math.inf, 0.0),)


def choose_codec(
    raw_bytes: float,
    link_bps: float,
    profiles: tuple[CodecProfile, ...] | list[CodecProfile],
    max_kl: float = 0.0,
    num_layers: int = 1,
) -> CodecProfile:
    """The fastest admissible codec for this hand-off. `max_kl` = 0 admits lossless codecs only."""
    if link_bps <= 0:
        raise InvalidRequest(f"link bandwidth must be > 0 bytes/s, got {link_bps}")
    admissible = [p for p in profiles if p.kl_mean <= max_kl]
    if not admissible:
        raise InvalidRequest(
            f"no codec meets the quality floor max_kl={max_kl} (have {[p.name for p in profiles]})"
        )
    return min(admissible, key=lambda p: (p.handoff_s(raw_bytes, link_bps, num_layers), p.kl_mean))


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
