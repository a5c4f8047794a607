"""`bench.codec_gpu` on whatever this host has: the CPU path always, the CUDA paths where CUDA exists."""

from __future__ import annotations

import torch

from bench.codec_gpu import run


def test_codec_gpu_reports_every_path_within_its_bound() -> None:
    r = run(tokens=400, repeats=1)
    assert r["cuda"] == torch.cuda.is_available()
    paths = {"cpu->cpu"} | ({"cuda->cuda", "cuda->cpu", "cpu->cuda"} if r["cuda"] else set())
    expected = {f"{codec}:{p}" for codec in ("cachegen", "cachegen_v1") for p in paths}
    assert set(r["paths"]) == expected | {"cachegen:cpu(torch)->cpu(torch)"}
    torch_path = r["paths"]["cachegen:cpu(torch)->cpu(torch)"]
    # the device path's code on CPU tensors: the compiled encoder's frames but for rare fp16 rounding of means
    assert torch_path["frames_identical_to_cpu"] >= 0.6 and torch_path["max_abs_diff_vs_cpu"] < 1e-2
    for name, p in r["paths"].items():
        assert p["within_bound"], (name, p["worst_error_over_bound"])
        assert p["encode_mb_s"] > 0 and p["decode_mb_s"] > 0
        assert 0 < p["frame_bytes"] < p["fp16_bytes"] / 4  # the default level is ~6x smaller than fp16
        if not name.endswith(
            ":cpu->cpu"
        ):  # the same quantized symbols, dequantized elsewhere: fp16 rounding apart
            assert p["max_abs_diff_vs_cpu"] < 1e-2
    assert r["all_within_bound"]
