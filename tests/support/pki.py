"""A throw-away PKI: a CA, a server certificate for 127.0.0.1 and localhost, and a client
certificate (ECDSA P-256), as PEM files. ``cryptography`` is imported when keys are made, not
with the module, so that the API server's process starts without it."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

FILES = ("ca.crt", "ca.key", "server.crt", "server.key", "client.crt", "client.key")


@dataclass(frozen=True)
class Pki:
    """PEM files: a CA, a server certificate for 127.0.0.1/localhost, and a client certificate."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def in_dir(cls, directory: Path) -> Pki:
        """The files ``make_pki(directory)`` wrote."""
        return cls(*(directory / name for name in FILES))


def _key() -> ec.EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    sans: Iterable[x509.GeneralName] = (),
    usage: x509.ObjectIdentifier | None = None,
) -> x509.Certificate:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        b = b.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        assert issuer is not None
        b = b.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    sans = list(sans)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if usage is not None:
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def make_pki(
    directory: Path, *, server_names: Iterable[str] = ("localhost",), server_ips: Iterable[str] = ()
) -> Pki:
    """A fresh CA, a server certificate valid for 127.0.0.1 (and ``server_names`` and
    ``server_ips``), and a client certificate, all written as PEM files (mode 0600) under
    ``directory``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID

    directory.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca = _cert("test kube CA", ca_key, None, ca_key, ca=True)
    srv_key = _key()
    sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in server_ips]
    sans += [x509.DNSName(n) for n in server_names]
    srv = _cert("kube-apiserver", srv_key, ca, ca_key, sans=sans, usage=ExtendedKeyUsageOID.SERVER_AUTH)
    cli_key = _key()
    cli = _cert("system:node:test", cli_key, ca, ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    pem = serialization.Encoding.PEM
    data = (
        ca.public_bytes(pem),
        _key_pem(ca_key),
        srv.public_bytes(pem),
        _key_pem(srv_key),
        cli.public_bytes(pem),
        _key_pem(cli_key),
    )
    for name, content in zip(FILES, data, strict=True):
        (directory / name).write_bytes(content)
        (directory / name).chmod(0o600)
    return Pki.in_dir(directory)
