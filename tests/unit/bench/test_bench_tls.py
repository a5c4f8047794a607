"""bench.tls with tiny settings (real server processes, real TLS handshakes, the AEAD ciphers): every figure
is reported, every mode's calls succeed, and a stream delivers every message."""

from __future__ import annotations

from bench.tls import MODES, measure_aes_gcm, measure_grpc


def test_tls_bench_reports_every_mode() -> None:
    r = measure_grpc(rounds=1, unary_n=20, stream_n=50)
    assert set(r) == set(MODES)
    for mode in MODES:
        assert r[mode]["unary_us"] > 0 and r[mode]["stream_msgs_per_s"] > 0 and r[mode]["connect_ms"] > 0
    for mode in ("tls", "mtls"):
        assert r[mode]["unary_x_plaintext"] > 0 and r[mode]["stream_x_plaintext"] > 0


def test_aead_throughput_is_measured_per_cipher_and_direction() -> None:
    r = measure_aes_gcm(mib=1, seconds=0.05)
    for cipher in ("aes256gcm", "chacha20poly1305"):
        for op in ("encrypt", "decrypt"):
            assert r[f"{cipher}_{op}_GBps"] > 0 and r[f"{cipher}_{op}_GB_per_cpu_s"] > 0
