"""The CacheGen codec's CUDA path against its CPU path, on the shipped model's real KV (`python -m bench.codec_gpu`).

Encodes the prefill KV of held-out text from fp16 tensors on the CPU and on the GPU, decodes each frame on the
CPU and with ``device="cuda"``, and reports, per path: encode and decode MB/s of fp16 K+V (wall clock, the GPU
synchronised), the frame size, and whether every reconstruction stays within the frame's stated error bound and
agrees with the CPU path's. Path "cpu(torch)->cpu(torch)" runs the CUDA path's code (torch statistics, quantizer and
dequantization, only uint8 symbols crossing to the host's rANS coder: `CacheGenCodec.device_path`) on CPU
tensors: its frames are compared byte for byte with the compiled CPU encoder's (`frames_identical_to_cpu`: they
differ only where torch's and the C pass's fp32 means round to different fp16 centres). Without CUDA it reports
``"cuda": false`` and the CPU paths only, so it runs (and is tested) anywhere; on a GPU host it is what
`infra/device/gpu_check.sh` runs. The entropy coder itself runs on the host CPU in every path.

One JSON object on stdout (or ``--json``), a human summary on stderr.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from torch import Tensor

from bench.codec import DEFAULT_MODEL, SKIP_TOKENS, heldout_ids
from bench.report import emit
from engine.kv_probe import KVProbe
from kv_transfer.codec import CodecContext
from kv_transfer.codec import cachegen_klt as klt
from kv_transfer.codec.cachegen import CacheGenCodec
from kv_transfer.codec.cachegen_v1 import error_allowance, error_bounds


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_path(
    codec: CacheGenCodec, kv: list[tuple[Tensor, Tensor]], enc_dev: str, dec_dev: str, repeats: int
) -> tuple[dict[str, Any], list[tuple[Tensor, Tensor]], list[tuple[bytes, bytes]]]:
    """Encode the layers' fp16 K/V placed on `enc_dev`, decode onto `dec_dev`: (medians over `repeats` rounds
    (one warm-up round dropped), the frame bytes and the worst |error| / bound over every element; the last
    round's reconstructions and frames per layer)."""
    on = [(k.to(enc_dev, torch.float16), v.to(enc_dev, torch.float16)) for k, v in kv]
    nbytes = sum(2 * k.numel() * 2 for k, _ in on)
    enc_s: list[float] = []
    dec_s: list[float] = []
    frames: list[tuple[bytes, bytes]] = []
    for r in range(repeats + 1):
        frames = []
        _sync(enc_dev)
        t0 = time.perf_counter()
        for layer, (k, v) in enumerate(on):
            params, parts = codec.encode_parts(k, v, layer)
            frames.append((bytes(params), b"".join(bytes(p) for p in parts)))
        _sync(enc_dev)
        t1 = time.perf_counter()
        outs = [
            codec.decode(p, w, tuple(k.shape), torch.float16, layer, device=dec_dev)
            for layer, ((p, w), (k, _)) in enumerate(zip(frames, on, strict=True))
        ]
        _sync(dec_dev)
        t2 = time.perf_counter()
        if r:
            enc_s.append(t1 - t0)
            dec_s.append(t2 - t1)
    worst = 0.0  # max error / allowance (the frame's bound + the output's rounding)
    for layer, ((p, _), (k, v), (k2, v2)) in enumerate(zip(frames, on, outs, strict=True)):
        worst = max(worst, error_over_bound(codec, p, layer, k, v, k2, v2))
    return (
        {
            "encode_mb_s": nbytes / statistics.median(enc_s) / 1e6,
            "decode_mb_s": nbytes / statistics.median(dec_s) / 1e6,
            "fp16_bytes": nbytes,
            "frame_bytes": sum(len(p) + len(w) for p, w in frames),
            "worst_error_over_bound": worst,
            "within_bound": worst <= 1.0,
        },
        outs,
        frames,
    )


def error_over_bound(
    codec: CacheGenCodec, params: bytes, layer: int, k: Tensor, v: Tensor, k2: Tensor, v2: Tensor
) -> float:
    """The worst error / allowance of one layer's reconstruction: per element for CacheGen's own quantizers
    (format v1), per token in L2 for transform coding (v5, `cachegen_klt.error_bounds_klt`)."""
    shape = tuple(k.shape)
    worst = 0.0
    if params[2] == klt.VERSION:
        assert codec.ctx.transform is not None  # it coded this frame
        bounds = klt.error_bounds_klt(params, shape, layer, codec.ctx.transform)
        for ref, got, bound in zip((k, v), (k2, v2), bounds, strict=True):
            x, x_hat = ref.cpu().float(), got.cpu().float()
            err = (x - x_hat).flatten(1).norm(dim=1)
            allowed = bound * (1 + 1e-4) + 2.0**-10 * 2 * x.flatten(1).norm(dim=1) + 1e-5  # + fp16 output
            worst = max(worst, float((err / allowed).max()))
        return worst
    for ref, got, bound in zip((k, v), (k2, v2), error_bounds(params, shape), strict=True):
        x, x_hat = ref.cpu(), got.cpu()
        allowed = error_allowance(x, x_hat, bound)
        worst = max(worst, float(((x.float() - x_hat.float()).abs() / allowed).max()))
    return worst


def run(tokens: int, repeats: int) -> dict[str, Any]:
    model_dir = str(DEFAULT_MODEL)
    ids = heldout_ids(model_dir)[SKIP_TOKENS : SKIP_TOKENS + tokens]
    probe = KVProbe(model_dir, tokens)
    kv = probe.prefill(ids)  # per layer (K, V) [T, Hkv, D] on the CPU
    transform = klt.load_model_transform(model_dir)
    layers = probe.cfg.num_layers
    codecs = {"cachegen_v1": CacheGenCodec(CodecContext(num_layers=layers), "default")}
    if transform is not None:
        codecs["cachegen"] = CacheGenCodec(CodecContext(num_layers=layers, transform=transform), "default")
    cuda = torch.cuda.is_available()
    paths = [("cpu", "cpu", False), ("cpu", "cpu", True)]
    paths += [("cuda", "cuda", False), ("cuda", "cpu", False), ("cpu", "cuda", False)] if cuda else []
    results: dict[str, dict[str, Any]] = {}
    for name, codec in codecs.items():
        ref: list[tuple[Tensor, Tensor]] = []
        ref_frames: list[tuple[bytes, bytes]] = []
        for e, d, device_path in paths:
            if device_path and name != "cachegen":
                continue  # format v1 has no separate device path
            codec.device_path = device_path
            r, outs, frames = time_path(codec, kv, e, d, repeats)
            codec.device_path = False
            key = f"{name}:{e}(torch)->{d}(torch)" if device_path else f"{name}:{e}->{d}"
            results[key] = r
            if (e, d, device_path) == ("cpu", "cpu", False):
                ref, ref_frames = outs, frames
                continue
            # another device (or the device path's code) quantized or dequantized: the same symbols up to rounding
            r["max_abs_diff_vs_cpu"] = max(
                float((got.float().cpu() - want.float()).abs().max())
                for layer_got, layer_want in zip(outs, ref, strict=True)
                for got, want in zip(layer_got, layer_want, strict=True)
            )
            if device_path:
                same = sum(a == b for a, b in zip(frames, ref_frames, strict=True))
                r["frames_identical_to_cpu"] = same / len(frames)
    return {
        "benchmark": "codec_gpu",
        "cuda": cuda,
        "device_name": torch.cuda.get_device_name(0) if cuda else None,
        "tokens": tokens,
        "layers": len(kv),
        "codec": "cachegen (default level): with the model's transform (format v5) and without (v1)",
        "entropy_coding": "host CPU (the compiled rANS coder) in every path: only uint8 symbols leave a GPU",
        "paths": results,
        "all_within_bound": all(r["within_bound"] for r in results.values()),
    }


def summary(r: dict[str, Any]) -> str:
    lines = [f"codec_gpu: cuda={r['cuda']} ({r['device_name']}), {r['tokens']} tokens x {r['layers']} layers"]
    for name, p in r["paths"].items():
        diff = p.get("max_abs_diff_vs_cpu")
        lines.append(
            f"  {name:22s} encode {p['encode_mb_s']:8.1f} MB/s  decode {p['decode_mb_s']:8.1f} MB/s  "
            f"{p['frame_bytes']} B  error/bound {p['worst_error_over_bound']:.3f}"
            + (f"  |diff vs cpu| {diff:.2e}" if diff is not None else "")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.codec_gpu", description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2000, help="prompt tokens whose KV is coded")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None, help="write the JSON object here instead of stdout")
    a = ap.parse_args(argv)
    result = run(a.tokens, a.repeats)
    emit(result, a.json, summary=summary(result))
    return 0 if result["all_within_bound"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
