"""Transports move whole messages between processes: ucx, tcp, shm (same host). `--transport auto`
(`default_scheme`): ucx for a CUDA instance where ucxx imports, else tcp.

`transport_for("tcp://h:1")` or `transport_for("tcp")` gives a Transport for that scheme;
`available_transports()` lists the usable schemes, preferred first.
"""

from __future__ import annotations

import logging

from kv_transfer.errors import UnknownTransport
from kv_transfer.transport._sockutil import split_scheme
from kv_transfer.transport.base import Channel, Listener, Transport
from kv_transfer.transport.shm import ShmTransport
from kv_transfer.transport.tcp import TCPTransport
from kv_transfer.transport.ucx import UCXTransport, ucx_available, ucx_unavailable_reason

log = logging.getLogger(__name__)

SCHEMES = ("ucx", "tcp", "shm")  # preference order


def available_transports() -> list[str]:
    """Usable schemes in preference order: ucx (if ucxx imports), tcp, shm."""
    return [s for s in SCHEMES if s != "ucx" or ucx_available()]


def default_scheme(cuda: bool = False) -> str:
    """The scheme `--transport auto` picks for a KV server of a CUDA instance (`cuda`) or a CPU one.

    CPU: tcp. Beside a step thread busy on the same core, UCX's blocking progress (progress, arm, select,
    several times a message) waits far longer than a socket's recv: a 6-layer, 1 MB pull between two one-core
    processes each running a decode-like loop took 226 ms over ucx against 34 ms over tcp and 36 ms over shm
    (about 3 ms each on idle cores; a 0.5 ms GIL switch interval did not change it). A CUDA instance keeps ucx where ucxx
    imports, else tcp (its step thread waits in kernels, not in Python; not measured). Logs the choice: an
    operator must see which transport a service runs, and why."""
    if not cuda:
        log.info("KV transport: tcp (a CPU instance; `--transport ucx` to use UCX)")
        return "tcp"
    reason = ucx_unavailable_reason()
    if reason is not None:
        log.warning("KV transport: tcp (%s; `pip install 'pdserve[ucx]'` adds UCX)", reason)
        return "tcp"
    log.info("KV transport: ucx")
    return "ucx"


def transport_for(address_or_scheme: str) -> Transport:
    """A Transport for 'ucx'/'tcp'/'shm' or an address like 'tcp://host:port'.

    Raises UnknownTransport for other schemes, TransportUnavailable for ucx when ucxx cannot be imported.
    """
    scheme, _ = split_scheme(address_or_scheme)
    if scheme == "tcp":
        return TCPTransport()
    if scheme == "shm":
        return ShmTransport()
    if scheme == "ucx":
        return UCXTransport()
    raise UnknownTransport(f"no transport for {address_or_scheme!r}; known schemes: {SCHEMES}")


__all__ = [
    "SCHEMES",
    "Channel",
    "Listener",
    "ShmTransport",
    "TCPTransport",
    "Transport",
    "UCXTransport",
    "available_transports",
    "default_scheme",
    "transport_for",
]
