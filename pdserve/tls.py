"""The one place that turns TLS flags into credentials: gRPC server and channel credentials, the Redis
client's TLS arguments, and the (certfile, keyfile) pair an HTTPS server loads.

Flags, the same on the coordinator, on every instance and on `pdserve up`:
    --tls-cert PEM --tls-key PEM   this process's certificate (chain) and private key; always together
    --tls-ca PEM                   the cluster CA. With it, every connection inside the cluster is mutual
                                   TLS: instance gRPC servers and the registry's Redis require a client
                                   certificate signed by this CA, and each process presents its own.
The gateway's public port serves TLS whenever the coordinator has --tls-cert/--tls-key; it never asks
clients for a certificate (clients authenticate with API keys).

Host names are verified: a certificate must name (SAN) the address it is reached at, e.g. IP:127.0.0.1
for an instance that advertises 127.0.0.1 (`pdserve certs --host` adds names; see pdserve/certs.py).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any

import grpc


class TLSConfigError(ValueError):
    """A TLS flag is incomplete or names a file that cannot be used (startup error, never at run time)."""


def _read(path: str, flag: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise TLSConfigError(f"{flag} {path}: cannot read: {exc.strerror or exc}") from None
    if b"-----BEGIN" not in data:
        raise TLSConfigError(f"{flag} {path}: not a PEM file")
    return data


@dataclass(frozen=True)
class TLSFiles:
    """Paths of PEM files; "" = not given. Checked on construction: a half pair, an unreadable file, a key
    that does not match its certificate or a CA file that holds no certificate is a TLSConfigError."""

    cert: str = ""  # this process's certificate chain
    key: str = ""  # its private key (unencrypted PEM)
    ca: str = ""  # the cluster CA: intra-cluster connections are mutual TLS

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            given, missing = ("--tls-cert", "--tls-key") if self.cert else ("--tls-key", "--tls-cert")
            raise TLSConfigError(f"{given} was given without {missing}: a certificate needs its key")
        if self.cert:
            _read(self.cert, "--tls-cert")
            _read(self.key, "--tls-key")
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            try:
                ctx.load_cert_chain(self.cert, self.key)
            except ssl.SSLError as exc:
                raise TLSConfigError(
                    f"--tls-cert {self.cert} / --tls-key {self.key}: not a matching certificate and key ({exc})"
                ) from None
        if self.ca:
            _read(self.ca, "--tls-ca")
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            try:
                ctx.load_verify_locations(cafile=self.ca)
            except ssl.SSLError as exc:
                raise TLSConfigError(f"--tls-ca {self.ca}: no usable CA certificate ({exc})") from None

    @property
    def enabled(self) -> bool:
        """This process has a certificate (serves TLS where it serves)."""
        return bool(self.cert)

    @property
    def mutual(self) -> bool:
        """Intra-cluster connections are mutual TLS (a CA was given)."""
        return bool(self.ca)

    def require_cluster_identity(self) -> None:
        """A cluster process under --tls-ca must present its own certificate to its peers."""
        if self.ca and not self.cert:
            raise TLSConfigError("--tls-ca needs this process's own --tls-cert and --tls-key (mutual TLS)")

    def as_args(self) -> list[str]:
        """The flags that rebuild these files in a child process."""
        out: list[str] = []
        if self.cert:
            out += ["--tls-cert", self.cert, "--tls-key", self.key]
        if self.ca:
            out += ["--tls-ca", self.ca]
        return out

    @staticmethod
    def from_args(a: Any) -> TLSFiles:
        """From an argparse namespace with tls_cert / tls_key / tls_ca (None or "" = not given)."""
        return TLSFiles(cert=a.tls_cert or "", key=a.tls_key or "", ca=a.tls_ca or "")


def add_tls_args(p: Any) -> None:
    """--tls-cert / --tls-key / --tls-ca on an argparse parser (services and `pdserve up`)."""
    p.add_argument("--tls-cert", default="", help="PEM certificate of this process (with --tls-key)")
    p.add_argument("--tls-key", default="", help="PEM private key of --tls-cert")
    p.add_argument(
        "--tls-ca", default="", help="PEM cluster CA: with it, connections inside the cluster are mutual TLS"
    )


# ---- gRPC -----------------------------------------------------------------------------------------
def server_credentials(tls: TLSFiles, client_auth: bool) -> grpc.ServerCredentials:
    """TLS with this process's certificate; with `client_auth`, peers must present one signed by the CA."""
    if not tls.enabled:
        raise TLSConfigError("serving TLS needs --tls-cert and --tls-key")
    if client_auth and not tls.mutual:
        raise TLSConfigError("requiring client certificates needs --tls-ca")
    pair = [(_read(tls.key, "--tls-key"), _read(tls.cert, "--tls-cert"))]
    if not client_auth:
        return grpc.ssl_server_credentials(pair)
    return grpc.ssl_server_credentials(
        pair, root_certificates=_read(tls.ca, "--tls-ca"), require_client_auth=True
    )


def add_port(server: grpc.Server | grpc.aio.Server, address: str, tls: TLSFiles, client_auth: bool) -> int:
    """Bind `address` on `server`: TLS when this process has a certificate (mutual with `client_auth`),
    plaintext otherwise. Returns the port (0 = could not bind)."""
    if tls.enabled:
        return server.add_secure_port(address, server_credentials(tls, client_auth))
    return server.add_insecure_port(address)


def channel_credentials(tls: TLSFiles) -> grpc.ChannelCredentials:
    """Verify the server against the CA (the system's roots if none) and present this process's
    certificate, if it has one."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca, "--tls-ca") if tls.ca else None,
        private_key=_read(tls.key, "--tls-key") if tls.key else None,
        certificate_chain=_read(tls.cert, "--tls-cert") if tls.cert else None,
    )


def cluster_channel(address: str, tls: TLSFiles, options: list[tuple[str, Any]]) -> grpc.aio.Channel:
    """An asyncio channel to an instance: mutual TLS under --tls-ca, plaintext otherwise."""
    if tls.mutual:
        return grpc.aio.secure_channel(address, channel_credentials(tls), options=options)
    return grpc.aio.insecure_channel(address, options=options)


def client_channel(address: str, tls: TLSFiles | None, options: list[tuple[str, Any]]) -> grpc.Channel:
    """A blocking channel to a gateway or instance: TLS when `tls` names any file, plaintext if None."""
    if tls is None or not (tls.ca or tls.cert):
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, channel_credentials(tls), options=options)


# ---- Redis (the registry) -------------------------------------------------------------------------
def redis_kwargs(url: str, tls: TLSFiles) -> dict[str, Any]:
    """Keyword arguments for `redis.Redis.from_url(url, ...)`. A `rediss://` URL gets the CA and this
    process's certificate; under --tls-ca a plaintext `redis://` URL is refused, so that registering
    always needs a certificate signed by the CA."""
    if not url.startswith("rediss://"):
        if tls.mutual:
            raise TLSConfigError(
                f"--tls-ca: the registry must be reached over TLS, got {url!r} (use a rediss:// URL; "
                "pdserve up --tls-ca starts its Redis with TLS)"
            )
        return {}
    out: dict[str, Any] = {"ssl_cert_reqs": "required"}
    if tls.ca:
        out["ssl_ca_certs"] = tls.ca
    if tls.cert:
        out["ssl_certfile"], out["ssl_keyfile"] = tls.cert, tls.key
    return out


def https_files(tls: TLSFiles) -> tuple[str, str] | None:
    """(certfile, keyfile) for an HTTPS server on the gateway's side (ssl.SSLContext.load_cert_chain),
    or None when this process has no certificate."""
    return (tls.cert, tls.key) if tls.enabled else None
