# pdserve developer targets. `make setup` then `make test` is what CI runs.
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
PROTO_SRC := $(wildcard protos/pdserve/v1/*.proto)

.PHONY: setup protos test lint format bench clean gpu-wheels wheel

setup:
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e '.[test,ucx,operator]'
	command -v redis-server >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server)
	# Compose, for the test that validates docker-compose.yml (`docker compose` or `docker-compose`; no daemon needed)
	docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null \
		|| (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose)
	# kubectl, for the test that renders infra/k8s with `kubectl kustomize` (offline)
	command -v kubectl >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends kubectl)
	$(MAKE) protos

# the wheel (gRPC stubs generated and the shipped model added by setup.py's build step) into dist/
wheel:
	$(VPY) -m pip wheel --no-deps -w dist .

protos:
	$(VPY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTO_SRC)

test:
	$(VPY) -m ruff check .
	$(VPY) -m mypy
	$(VPY) -m pytest -q -m 'not flaky' tests

lint:
	$(VPY) -m ruff check .
	$(VPY) -m ruff format --check .

format:
	$(VPY) -m ruff format .
	$(VPY) -m ruff check --fix .

# Python packages the device machine's image lacks (cp312 wheels, into the git-ignored .whl/), for
# infra/device/gpu_check.sh (README, "GPU paths"). The image has CUDA 13, so ucxx comes as its -cu13 build; its
# native wheels are trimmed of static archives, headers and duplicate .so copies (infra/device/trim_wheel.py:
# 55 MB -> 14 MB) so that they and the working tree fit the device tool's 64 MiB transfer.
GPU_WHEELS := grpcio==1.85.3 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 \
	protobuf==7.36.2 redis==8.1.0 opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 \
	opentelemetry-semantic-conventions==0.66b2 \
	ucxx-cu13==0.52.0 libucxx-cu13==0.52.0 libucx-cu13==1.21.0 librmm-cu13==26.10.0 rmm-cu13==26.10.0 \
	rapids-logger==0.3.0
gpu-wheels:
	rm -rf .whl
	$(VPY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)
	$(VPY) infra/device/trim_wheel.py .whl/libucx_*.whl .whl/libucxx_*.whl .whl/librmm_*.whl
	# redis-server (the tests start one) with the libraries it links beyond glibc and the C++ runtime
	mkdir -p .whl/redis && cp "$$(command -v redis-server)" .whl/redis/
	ldd .whl/redis/redis-server | awk '$$3 ~ /^\// {print $$3}' \
		| grep -Ev '/(libc|libm|libstdc\+\+|libgcc_s)\.so' | xargs -r cp -L -t .whl/redis/
	du -ch .whl/*.whl .whl/redis/* | tail -1

clean:
	rm -rf $(VENV) pdserve/v1/*_pb2*.py pdserve/v1/*_pb2.pyi
