"""Build steps pyproject.toml cannot declare: the wheel gets the gRPC stubs generated from protos/ (so
`grpcio-tools` is a build dependency, never a runtime one), the shipped model's runtime files as package
data (`pdserve/models/pdserve-tiny-py`, found by engine/model_dir.py), and the KV codec's compiled rANS coder
(`kv_transfer/codec/rans.c` -> `kv_transfer/codec/_rans*.so`, loaded with ctypes by rans.py). Development
keeps `make protos`, which writes the same stubs into the source tree; a source checkout without the built
coder compiles rans.c on first use (engine/cbuild.py)."""

from __future__ import annotations

import glob
import hashlib
import os
import shutil

from setuptools import Extension, setup
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
    "cachegen_rate.json",
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


def rans_extension() -> Extension:
    """rans.c as a plain shared library (no Python API: rans.py opens it with ctypes). Portable flags, no
    -march: the hot loops carry target_clones (x86-64 and x86-64-v3, chosen when the library loads). The
    source id lets rans.py refuse a library built from another rans.c (kv_transfer/codec/rans.py)."""
    rel = "kv_transfer/codec/rans.c"
    with open(os.path.join(HERE, rel), "rb") as f:
        sid = hashlib.sha256(f.read()).hexdigest()[:16]
    return Extension(
        "kv_transfer.codec._rans",
        sources=[rel],
        define_macros=[("CG_SOURCE_ID", f'"{sid}"')],
        extra_compile_args=["-O3", "-fopenmp-simd", "-fno-math-errno"],
        libraries=["m"],
    )


setup(cmdclass={"build_py": BuildPyWithStubsAndModel}, ext_modules=[rans_extension()])
