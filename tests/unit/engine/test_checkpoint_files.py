"""The calibration files `pdserve calibrate` writes beside a checkpoint are never taken for weights."""

from __future__ import annotations

from pathlib import Path

from engine.checkpoint import safetensors_files


def test_calibration_files_beside_unindexed_shards_are_not_weights(tmp_path: Path) -> None:
    for name in (
        "w-1.safetensors",
        "w-2.safetensors",
        "cachegen_tables.safetensors",
        "cachegen_transform.safetensors",
    ):
        (tmp_path / name).write_bytes(b"")
    assert [Path(f).name for f in safetensors_files(str(tmp_path))] == ["w-1.safetensors", "w-2.safetensors"]
