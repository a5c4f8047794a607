"""Transports move whole messages between processes: ucx (default where ucxx imports), tcp, shm (same host).

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


def default_scheme() -> str:
    """ucx where ucxx imports (the `ucx` extra: `pip install 'pdserve[ucx]'`), else tcp. Logs the choice:
    an operator must see which transport a service runs, and why UCX was not chosen."""
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
