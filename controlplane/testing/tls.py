"""Throwaway certificates: a local CA, a server certificate for loopback, client certificates.

The demo (`controlplane demo --serve --tls`) and the tests need HTTPS agents without
asking anyone for a certificate. `make_certificates(directory)` writes a fresh CA and a
server certificate for 127.0.0.1, ::1 and localhost signed by it, plus a client
certificate (for mutual TLS) and a second, unrelated CA with a client certificate of its
own (a client the agents must refuse). Keys are ECDSA P-256, valid for a day (the demo's
and a test's lifetime), and written mode 0600.

This is not a PKI: nothing here is fit for production certificates.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_FOR = datetime.timedelta(days=1)


@dataclass(frozen=True, slots=True)
class CertPair:
    cert_file: Path
    key_file: Path


@dataclass(frozen=True, slots=True)
class Certificates:
    """Where `make_certificates` wrote everything."""

    directory: Path
    ca_file: Path
    server: CertPair
    client: CertPair
    # Signed by another CA: valid, but not one the agents trust.
    stranger: CertPair
    stranger_ca_file: Path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _ca(common: str, now: datetime.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(_name(common))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALID_FOR)
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


def _leaf(
    directory: Path,
    stem: str,
    common: str,
    usage: x509.ObjectIdentifier,
    ca_key: ec.EllipticCurvePrivateKey,
    ca: x509.Certificate,
    now: datetime.datetime,
) -> CertPair:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALID_FOR)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if usage == ExtendedKeyUsageOID.SERVER_AUTH:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    pair = CertPair(directory / f"{stem}.crt", directory / f"{stem}.key")
    _write_cert(pair.cert_file, cert)
    _write_key(pair.key_file, key)
    return pair


def make_certificates(directory: Path) -> Certificates:
    """A fresh CA, server and client certificates in `directory` (created if needed)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key, ca = _ca("controlplane throwaway CA", now)
    ca_file = directory / "ca.crt"
    _write_cert(ca_file, ca)
    server = _leaf(
        directory, "server", "controlplane agent", ExtendedKeyUsageOID.SERVER_AUTH, ca_key, ca, now
    )
    client = _leaf(
        directory, "client", "controlplane client", ExtendedKeyUsageOID.CLIENT_AUTH, ca_key, ca, now
    )
    other_key, other = _ca("some other CA", now)
    stranger_ca_file = directory / "other-ca.crt"
    _write_cert(stranger_ca_file, other)
    stranger = _leaf(
        directory,
        "stranger",
        "not a controlplane client",
        ExtendedKeyUsageOID.CLIENT_AUTH,
        other_key,
        other,
        now,
    )
    return Certificates(directory, ca_file, server, client, stranger, stranger_ca_file)
