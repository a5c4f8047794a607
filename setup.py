"""Build steps pyproject.toml cannot declare: the wheel gets the gRPC stubs generated from protos/ (so
`grpcio-tools` is a build dependency, never a runtime one) and the shipped model's runtime files as package
data (`pdserve/models/pdserve-tiny-py`, found by engine/model_dir.py). Development keeps `make protos`, which
writes the same stubs into the source tree."""

from __future__ import annotations

import glob
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
SHIPPED_MODEL = "pdserve-tiny-py"
# what a service reads; keep in step with engine/model_dir.py SHIPPED_RUNTIME_FILES (a unit test checks)
SHIPPED_RUNTIME_FILES = (
    "README.md",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "cachegen_plan.json",
    "cachegen_tables.safetensors",
    "cachegen_transform.safetensors",
    "codec_profiles.json",
)


class BuildPyWithStubsAndModel(build_py):
    def run(self) -> None:
        super().run()
        self._generate_stubs()
        self._copy_model()

    def _generate_stubs(self) -> None:
        from grpc_tools import protoc

        protos = sorted(glob.glob(os.path.join(HERE, "protos", "pdserve", "v1", "*.proto")))
        if not protos:
            raise RuntimeError("no protos/pdserve/v1/*.proto to generate the gRPC stubs from")
        include = os.path.join(os.path.dirname(protoc.__file__), "_proto")  # google/protobuf/*.proto
        out = self.build_lib
        args = ["grpc_tools.protoc", f"-I{os.path.join(HERE, 'protos')}", f"-I{include}"]
        args += [f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", *protos]
        if protoc.main(args) != 0:
            raise RuntimeError(f"grpc_tools.protoc failed: {' '.join(args)}")

    def _copy_model(self) -> None:
        src = os.path.join(HERE, "models", SHIPPED_MODEL)
        dst = os.path.join(self.build_lib, "pdserve", "models", SHIPPED_MODEL)
        os.makedirs(dst, exist_ok=True)
        for name in SHIPPED_RUNTIME_FILES:
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))


setup(cmdclass={"build_py": BuildPyWithStubsAndModel})
