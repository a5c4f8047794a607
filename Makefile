# pdserve developer targets. `make setup` then `make test` is what CI runs.
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
PROTO_SRC := $(wildcard protos/pdserve/v1/*.proto)

.PHONY: setup protos test lint format bench clean

setup:
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e '.[test]'
	command -v redis-server >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server)
	$(MAKE) protos

protos:
	$(VPY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTO_SRC)

test:
	$(VPY) -m ruff check .
	$(VPY) -m pytest -q tests

lint:
	$(VPY) -m ruff check .
	$(VPY) -m ruff format --check .

format:
	$(VPY) -m ruff format .
	$(VPY) -m ruff check --fix .

clean:
	rm -rf $(VENV) pdserve/v1/*_pb2*.py pdserve/v1/*_pb2.pyi
