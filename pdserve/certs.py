"""Development certificates: one CA and one certificate + key that every process of a local cluster
presents, both as server and as client (`pdserve certs DIR`; the TLS tests make theirs the same way).

    DIR/ca.pem      the CA certificate (give it as --tls-ca, and to clients)
    DIR/ca-key.pem  the CA's private key (mode 0600; needed only to sign more certificates)
    DIR/cert.pem    a certificate signed by the CA, SANs = `hosts`, usable for TLS servers and clients
    DIR/key.pem     its private key (mode 0600)

Keys are ECDSA P-256. These are for development and tests: a production cluster uses its own PKI.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class CertFiles:
    ca: str
    ca_key: str
    cert: str
    key: str


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pdserve development"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_ca(common_name: str, days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hosts: Sequence[str],
    common_name: str,
    days: int,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A leaf certificate for TLS servers and clients, valid for `hosts` (DNS names or IP addresses)."""
    if not hosts:
        raise ValueError("a certificate needs at least one host name or address")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _write(path: Path, data: bytes, private: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_dev_certs(
    out_dir: str | Path, hosts: Sequence[str] = DEFAULT_HOSTS, days: int = 365, overwrite: bool = False
) -> CertFiles:
    """Write a new CA and one certificate signed by it into `out_dir` (created if missing). Refuses to
    replace existing files unless `overwrite`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = CertFiles(
        ca=str(out / "ca.pem"),
        ca_key=str(out / "ca-key.pem"),
        cert=str(out / "cert.pem"),
        key=str(out / "key.pem"),
    )
    existing = [p for p in (files.ca, files.ca_key, files.cert, files.key) if os.path.exists(p)]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} already exist(s); pass overwrite to replace")
    ca_key, ca_cert = make_ca("pdserve development CA", days)
    key, cert = make_cert(ca_key, ca_cert, hosts, hosts[0], days)
    _write(Path(files.ca_key), _key_pem(ca_key), private=True)
    _write(Path(files.ca), ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(Path(files.key), _key_pem(key), private=True)
    _write(Path(files.cert), cert.public_bytes(serialization.Encoding.PEM), private=False)
    return files
