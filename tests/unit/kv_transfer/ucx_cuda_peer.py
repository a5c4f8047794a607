"""Peer process for test_ucx_moves_cuda_tensors: connect to argv[1] over UCX, send a CUDA tensor holding a
known byte pattern of argv[2] bytes, then b"after"; exit 0 once the receiver, having checked both, answers
b"done"."""

from __future__ import annotations

import sys

import torch

from kv_transfer.transport import transport_for
from kv_transfer.transport.ucx import UCXChannel


def pattern(nbytes: int) -> torch.Tensor:
    return (torch.arange(nbytes, device="cuda", dtype=torch.int64) % 251).to(torch.uint8)


def main() -> int:
    address, nbytes = sys.argv[1], int(sys.argv[2])
    data = pattern(nbytes)
    ch = transport_for("ucx").connect(address, timeout=20)
    assert isinstance(ch, UCXChannel)  # whose send also takes a CUDA tensor
    ch.send(data, timeout=20)
    ch.send(b"after", timeout=20)
    assert bytes(ch.recv(timeout=30)) == b"done"  # the receiver has both: this endpoint may go
    ch.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
