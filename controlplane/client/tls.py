"""The TLS context a client of the agents needs: which CA to trust, which certificate to show.

Agents that serve HTTPS (`api.tls`) usually have certificates from a private CA, and
with mutual TLS they refuse a client without a certificate of theirs. Every client of
the agents takes an `ssl.SSLContext` (`DecisionFollower(ssl=...)`,
`FlagsClient(ssl=...)`, the load balancer adapters' reporter, cpctl's `Client`);
`client_context` builds one:

    from controlplane.client.tls import client_context
    ctx = client_context(ca_file="/etc/controlplane/ca.crt",
                         cert_file="/etc/controlplane/app.crt", key_file="/etc/controlplane/app.key")
    async with FlagsClient(["https://10.0.0.1:8700"], ssl=ctx) as flags: ...

It verifies the agents' certificates and host names (TLS 1.2 at least), trusting
`ca_file` when given and the system's CAs otherwise. Problems with the files raise
`TlsFilesError`, one line naming the file, never an OpenSSL traceback.

Standard library only (no aiohttp), so that cpctl can use it too.
"""

from __future__ import annotations

import os
import ssl

from controlplane.errors import ControlplaneError

PathLike = str | os.PathLike[str]


class TlsFilesError(ControlplaneError, ValueError):
    """A CA, certificate or key file cannot be used; the message names it and why."""


def _no_passphrase() -> bytes:
    raise TlsFilesError("the key is encrypted: give it without a passphrase")


def client_context(
    ca_file: PathLike | None = None,
    cert_file: PathLike | None = None,
    key_file: PathLike | None = None,
) -> ssl.SSLContext:
    """A client context trusting `ca_file` (else the system CAs), showing `cert_file`/`key_file`.

    `cert_file` and `key_file` go together (mutual TLS); a PEM file holding both may be
    given as `cert_file` alone.
    """
    if key_file is not None and cert_file is None:
        raise TlsFilesError("a key file was given without its certificate file")
    try:
        context = ssl.create_default_context(cafile=None if ca_file is None else os.fspath(ca_file))
    except FileNotFoundError:
        raise TlsFilesError(f"CA file {os.fspath(ca_file or '')}: no such file") from None
    except ssl.SSLError as e:  # before OSError, its base class
        raise TlsFilesError(
            f"CA file {os.fspath(ca_file or '')}: not a PEM CA certificate ({e.reason or e})"
        ) from None
    except OSError as e:
        raise TlsFilesError(f"CA file {os.fspath(ca_file or '')}: {e.strerror or e}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None:
        cert = os.fspath(cert_file)
        key = None if key_file is None else os.fspath(key_file)
        try:
            context.load_cert_chain(cert, key, password=_no_passphrase)
        except ssl.SSLError as e:  # before OSError, its base class
            if e.reason == "KEY_VALUES_MISMATCH":
                raise TlsFilesError(f"key {key or cert} is not the key of certificate {cert}") from None
            raise TlsFilesError(
                f"certificate {cert} or key {key or cert}: not PEM ({e.reason or e})"
            ) from None
        except OSError as e:
            raise TlsFilesError(f"certificate {cert} or key {key or cert}: {e.strerror or e}") from None
    return context
