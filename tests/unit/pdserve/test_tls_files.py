"""TLS flags -> files: every incomplete or unusable combination is a clear startup error; the development
certificates name the hosts they are for and chain to their CA."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from coordinator.config import CoordinatorConfig
from pdserve.certs import write_dev_certs
from pdserve.instance import InstanceConfig
from pdserve.tls import TLSConfigError, TLSFiles, redis_kwargs


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("certs")
    return write_dev_certs(root / "a", hosts=("localhost", "127.0.0.1", "pd-0.svc")), write_dev_certs(
        root / "b"
    )


def test_dev_certs_name_their_hosts_and_chain_to_the_ca(certs) -> None:
    a, b = certs
    ca = x509.load_pem_x509_certificate(Path(a.ca).read_bytes())
    leaf = x509.load_pem_x509_certificate(Path(a.cert).read_bytes())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "pd-0.svc"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    leaf.verify_directly_issued_by(ca)
    other_ca = x509.load_pem_x509_certificate(Path(b.ca).read_bytes())
    with pytest.raises(InvalidSignature):  # same name, another key
        leaf.verify_directly_issued_by(other_ca)
    assert os.stat(a.key).st_mode & 0o777 == 0o600 and os.stat(a.ca_key).st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        write_dev_certs(Path(a.ca).parent)


def test_half_pairs_and_unusable_files_are_startup_errors(certs, tmp_path: Path) -> None:
    a, b = certs
    assert TLSFiles(a.cert, a.key, a.ca).mutual
    with pytest.raises(TLSConfigError, match="--tls-cert was given without --tls-key"):
        TLSFiles(cert=a.cert)
    with pytest.raises(TLSConfigError, match="--tls-key was given without --tls-cert"):
        TLSFiles(key=a.key)
    with pytest.raises(TLSConfigError, match="--tls-ca .*missing.pem: cannot read"):
        TLSFiles(ca=str(tmp_path / "missing.pem"))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(TLSConfigError, match="not a PEM file"):
        TLSFiles(cert=str(junk), key=a.key)
    with pytest.raises(TLSConfigError, match="not a matching certificate and key"):
        TLSFiles(cert=a.cert, key=b.key)
    with pytest.raises(TLSConfigError, match="no usable CA certificate"):
        TLSFiles(ca=a.key)  # a PEM, but a key


def test_services_need_their_own_certificate_under_a_ca(certs) -> None:
    a, _ = certs
    with pytest.raises(TLSConfigError, match="needs this process's own --tls-cert"):
        CoordinatorConfig(model_dir="m", redis_url="rediss://x", tls=TLSFiles(ca=a.ca))
    with pytest.raises(TLSConfigError, match="needs this process's own --tls-cert"):
        InstanceConfig(role="prefill", model_dir="m", redis_url="rediss://x", tls=TLSFiles(ca=a.ca))
    with pytest.raises(TLSConfigError, match="only as mutual TLS"):
        InstanceConfig(role="prefill", model_dir="m", redis_url="redis://x", tls=TLSFiles(a.cert, a.key))
    # a gateway may serve TLS to clients with a plaintext cluster behind it
    assert CoordinatorConfig(model_dir="m", redis_url="redis://x", tls=TLSFiles(a.cert, a.key)).tls.enabled


def test_registry_under_a_ca_must_be_tls(certs) -> None:
    a, _ = certs
    mutual = TLSFiles(a.cert, a.key, a.ca)
    with pytest.raises(TLSConfigError, match="rediss://"):
        redis_kwargs("redis://127.0.0.1:6379/0", mutual)
    assert redis_kwargs("rediss://127.0.0.1:6379/0", mutual) == {
        "ssl_cert_reqs": "required",
        "ssl_ca_certs": a.ca,
        "ssl_certfile": a.cert,
        "ssl_keyfile": a.key,
    }
    assert redis_kwargs("redis://127.0.0.1:6379/0", TLSFiles()) == {}


def test_pdserve_up_tls_dir_names_the_three_files_and_single_flags_override(certs) -> None:
    from pdserve.cli import _up_tls, build_parser

    a, b = certs
    tls_dir = str(Path(a.ca).parent)
    tls = _up_tls(build_parser().parse_args(["up", "--tls-dir", tls_dir]))
    assert tls == TLSFiles(cert=a.cert, key=a.key, ca=a.ca)
    tls = _up_tls(build_parser().parse_args(["up", "--tls-dir", tls_dir, "--tls-ca", b.ca]))
    assert tls == TLSFiles(cert=a.cert, key=a.key, ca=b.ca)
    assert _up_tls(build_parser().parse_args(["up"])) == TLSFiles()
