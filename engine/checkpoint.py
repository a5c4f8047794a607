"""A checkpoint directory's weight files and its identity (pure Python: the coordinator reads these
without loading torch)."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import struct

_FINGERPRINT_DATA_BYTES = 64 * 2**10  # per weight file: header + this much tensor data is hashed


def safetensors_files(model_dir: str) -> list[str]:
    """The weight files of `model_dir`, sorted. Sharded checkpoints are listed by their index json."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(model_dir, n) for n in names]
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.exists(single):  # other *.safetensors beside it (the codecs' cachegen_*) are not weights
        return [single]
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    # `pdserve calibrate` writes cachegen_tables / cachegen_transform .safetensors beside the weights
    files = [f for f in files if not os.path.basename(f).startswith("cachegen_")]
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    return files


def model_fingerprint(model_dir: str) -> int:
    """u64 identifying a checkpoint: sha256 of config.json and each weight file's name, size, safetensors
    header and first 64 KiB of tensor data. Cheap (no full hash of the weights)."""
    h = hashlib.sha256()
    with open(os.path.join(model_dir, "config.json"), "rb") as f:
        h.update(f.read())
    for path in safetensors_files(model_dir):
        h.update(os.path.basename(path).encode() + struct.pack("<Q", os.path.getsize(path)))
        with open(path, "rb") as f:
            header_len = f.read(8)
            h.update(header_len + f.read(struct.unpack("<Q", header_len)[0]))
            h.update(f.read(_FINGERPRINT_DATA_BYTES))
    return int.from_bytes(h.digest()[:8], "little")
