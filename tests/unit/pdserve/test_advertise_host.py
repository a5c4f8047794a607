"""What an instance writes into the registry as its address: --advertise-host, else --host, and never a
wildcard host nobody can connect to."""

from __future__ import annotations

import pytest

from kv_transfer.transport._sockutil import advertised
from pdserve.instance import InstanceConfig, own_address


def _cfg(host: str = "127.0.0.1", advertise_host: str = "") -> InstanceConfig:
    return InstanceConfig(
        role="prefill",
        model_dir="m",
        redis_url="redis://127.0.0.1:1/0",
        host=host,
        advertise_host=advertise_host,
    )


def test_advertised_host() -> None:
    assert _cfg().advertised_host == "127.0.0.1"
    assert _cfg(host="0.0.0.0", advertise_host="10.1.2.3").advertised_host == "10.1.2.3"
    wildcard = _cfg(host="0.0.0.0").advertised_host
    assert wildcard == own_address() and wildcard not in ("0.0.0.0", "")


@pytest.mark.parametrize(
    ("address", "host", "want"),
    [
        ("tcp://0.0.0.0:4000", "10.1.2.3", "tcp://10.1.2.3:4000"),
        ("ucx://host-a:4000", "fd00::1", "ucx://[fd00::1]:4000"),
        ("tcp://127.0.0.1:4000", "", "tcp://127.0.0.1:4000"),
        ("shm://pdserve-kv-1", "10.1.2.3", "shm://pdserve-kv-1"),
    ],
)
def test_kv_address_names_the_advertised_host(address: str, host: str, want: str) -> None:
    assert advertised(address, host) == want
