#!/usr/bin/env bash
# The GPU checks, as one short run on a device machine (README, "GPU paths"). From a session lent one:
#   make gpu-wheels      # here, once: the packages the device image lacks (ucxx-cu13 included), into .whl/
#   run(command="bash infra/device/gpu_check.sh", carry=[".whl", "pdserve/v1"], timeout_s=420)
# What it checks: the CUDA-guarded tests (GPU device binding, the CUDA model runner against the CPU one, the
# CacheGen codec's CUDA quantization against its CPU bound, and UCX moving CUDA tensors where ucxx imports),
# then bench.codec_gpu (the codec's CUDA path against its CPU path on the shipped model's KV). Everything it
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
{
    if command -v nvidia-smi >/dev/null; then nvidia-smi -L; else echo "no nvidia-smi"; fi
    "$PY" - <<'PYEOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
for name in ("grpc", "google.protobuf", "constriction", "ucxx", "numpy", "safetensors", "tokenizers"):
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
    "tests/unit/kv_transfer/test_kvt_transport.py::test_ucx_moves_cuda_tensors" \
    "tests/unit/bench/test_bench_codec_gpu.py" 2>&1 | tee "$OUT/pytest.txt" || status=1
"$PY" -m bench.codec_gpu --json "$OUT/codec_gpu.json" 2>&1 | tee -a "$OUT/pytest.txt" || status=1
exit $status
