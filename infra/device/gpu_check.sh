#!/usr/bin/env bash
# The GPU checks, as one short run on a device machine (README, "GPU paths"). From a session lent one:
#   make gpu-wheels      # here, once: the packages the device image lacks (ucxx-cu13 included), into .whl/
#   run(command="bash infra/device/gpu_check.sh", carry=[".whl", "pdserve/v1"], timeout_s=420)
# What it checks: the CUDA-guarded tests (GPU device binding, the CUDA model runner against the CPU one, the
# CacheGen codec's CUDA quantization against its CPU bound (format v1, v2's transform on the GPU,
# cachegen_l0's layer 0 from a bf16 CUDA prefill), UCX
# moving CUDA tensors where ucxx imports, the transports and KV pulls with UCX's CUDA transports enabled, and a 1P1D cluster on the GPU whose greedy
# tokens must equal a single-process CUDA run; redis-server travels in .whl/redis), then bench.codec_gpu (the codec's CUDA path against its CPU path on the shipped model's KV). Everything it
# prints lands in $OUT (env.txt, pytest.txt, codec_gpu.json); the exit status is nonzero if any check failed.
set -uo pipefail
OUT=${OUT:-/tmp/pdserve-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed" | tee "$OUT/env.txt"; exit 2; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! command -v redis-server >/dev/null && [ -x .whl/redis/redis-server ]; then
    # the carried redis-server (make gpu-wheels) with its own libraries, behind a wrapper on PATH
    mkdir -p /tmp/bin
    printf '#!/bin/sh\nLD_LIBRARY_PATH=%s exec %s "$@"\n' "$PWD/.whl/redis" "$PWD/.whl/redis/redis-server" \
        >/tmp/bin/redis-server
    chmod +x /tmp/bin/redis-server
    export PATH="/tmp/bin:$PATH"
fi
{
    if command -v nvidia-smi >/dev/null; then nvidia-smi -L; else echo "no nvidia-smi"; fi
    "$PY" - <<'PYEOF'
import importlib, torch
import shutil
print("redis-server", shutil.which("redis-server"))
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
for name in ("grpc", "google.protobuf", "ucxx", "numpy", "safetensors", "tokenizers"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "?"))
    except Exception as exc:  # noqa: BLE001 - a report, not a failure
        print(name, "MISSING:", exc)
PYEOF
} 2>&1 | tee "$OUT/env.txt"

status=0
"$PY" -m pytest -q -rs -p no:cacheprovider --import-mode=importlib \
    "tests/unit/engine/test_device.py" \
    "tests/unit/engine/test_local_engine.py::test_cuda_runner_matches_cpu" \
    "tests/unit/kv_transfer/test_cachegen.py::test_cuda_quantization_matches_cpu_bound" \
    "tests/unit/kv_transfer/test_cachegen_klt.py::test_cuda_tensors_transform_on_the_gpu" \
    "tests/unit/kv_transfer/test_cachegen_l0.py::test_cuda_bf16_prefill_layer0_travels_as_ids" \
    "tests/unit/kv_transfer/test_kvt_transport.py" \
    "tests/integration/kv_transfer" \
    "tests/unit/pdserve" \
    "tests/unit/bench/test_bench_codec_gpu.py" \
    "tests/e2e/test_cluster_cuda.py" \
    --deselect "tests/unit/kv_transfer/test_kvt_transport.py::test_ucx_moves_cuda_tensors" \
    2>&1 | tee "$OUT/pytest.txt" || status=1
# UCX with CUDA buffers can crash the process (SIGSEGV inside UCX): its own pytest run, then the probe of
# which UCX set-ups work here (each variant in a subprocess)
"$PY" -m pytest -q -rs -p no:cacheprovider --import-mode=importlib \
    "tests/unit/kv_transfer/test_kvt_transport.py::test_ucx_moves_cuda_tensors" 2>&1 | tail -5 \
    | tee -a "$OUT/pytest.txt"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
"$PY" infra/device/ucx_cuda_probe.py --json "$OUT/ucx_cuda_probe.json" 2>&1 | grep -v '^[ {}"]' || true
"$PY" -m bench.codec_gpu --json "$OUT/codec_gpu.json" 2>&1 | tee -a "$OUT/pytest.txt" || status=1
exit $status
