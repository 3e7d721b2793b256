"""TLS for the listening side (the HTTP API and the AMI gate): a server context, TLS 1.2 or later."""

from __future__ import annotations

import ssl


class TlsError(Exception):
    pass


def _no_passphrase() -> bytes:
    return b""


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """A server context from a PEM certificate chain and its private key.

    TLS 1.2 is the floor (RFC 8996 deprecates 1.0 and 1.1); the cipher suites are Python's secure
    defaults, and no client certificate is asked for (clients authenticate inside the protocol).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        # An encrypted key is refused rather than prompted for on a terminal a daemon does not have.
        context.load_cert_chain(cert, key, password=_no_passphrase)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError; ValueError: NUL in a path
        raise TlsError(f"cannot load the certificate {cert!r} with the key {key!r}: {exc}") from None
    return context
