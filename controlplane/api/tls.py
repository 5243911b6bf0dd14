"""HTTPS for the agent's API: the server's TLS context from `api.tls`, or every problem with it.

An operator who turns TLS on must learn at start-up (and from `check-config`) that a
file is missing, unreadable, not what it should be, or that the key does not belong
to the certificate: one line per problem naming the field (`api.tls.key_file: ...`),
like every other configuration error, rather than an OpenSSL traceback at the first
connection.

The context has modern defaults: TLS 1.2 at least, OpenSSL's default ciphers for a
server (`ssl.create_default_context`). With `client_ca_file`, mutual TLS: a client must
present a certificate signed by that CA (`CERT_REQUIRED`), or the handshake fails.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from controlplane.config import ApiTlsConfig
from controlplane.errors import ConfigError

WHERE = "api.tls"


class _Encrypted(Exception):
    """The key file asked for a passphrase: an agent starts unattended, it has none to give."""


def _no_passphrase() -> bytes:
    raise _Encrypted


def _readable(path: Path, field: str) -> str | None:
    """Why `path` cannot be read, as a problem line for `field`; None when it can."""
    try:
        with path.open("rb") as f:
            if not f.read(1):
                return f"{WHERE}.{field}: the file is empty (got {str(path)!r})"
    except OSError as e:
        return f"{WHERE}.{field}: cannot read ({e.strerror or e}) (got {str(path)!r})"
    return None


def server_context(tls: ApiTlsConfig) -> ssl.SSLContext:
    """The server's TLS context; `ConfigError` with every problem found in `tls`'s files."""
    problems = [
        p
        for p in (
            _readable(tls.cert_file, "cert_file"),
            _readable(tls.key_file, "key_file"),
            _readable(tls.client_ca_file, "client_ca_file") if tls.client_ca_file is not None else None,
        )
        if p is not None
    ]
    if problems:
        raise ConfigError(problems)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # The certificate first on its own: a file that holds none is named as the culprit,
    # so that a failure of load_cert_chain below can only be the key's.
    try:
        ssl.create_default_context(cafile=str(tls.cert_file))
    except ssl.SSLError:
        problems.append(f"{WHERE}.cert_file: not a PEM certificate (got {str(tls.cert_file)!r})")
    else:
        try:
            context.load_cert_chain(str(tls.cert_file), str(tls.key_file), password=_no_passphrase)
        except _Encrypted:
            problems.append(
                f"{WHERE}.key_file: the key is encrypted; the agent needs it without a passphrase "
                f"(got {str(tls.key_file)!r})"
            )
        except ssl.SSLError as e:
            if e.reason == "KEY_VALUES_MISMATCH":
                problems.append(
                    f"{WHERE}.key_file: not the key of the certificate in {WHERE}.cert_file "
                    f"(got {str(tls.key_file)!r})"
                )
            else:
                problems.append(f"{WHERE}.key_file: not a PEM private key (got {str(tls.key_file)!r})")
    if tls.client_ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(tls.client_ca_file))
        except ssl.SSLError:
            problems.append(
                f"{WHERE}.client_ca_file: not a PEM CA certificate (got {str(tls.client_ca_file)!r})"
            )
        context.verify_mode = ssl.CERT_REQUIRED
    if problems:
        raise ConfigError(problems)
    return context
