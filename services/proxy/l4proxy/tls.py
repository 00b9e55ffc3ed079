"""The server-side TLS context for mutual TLS."""

from __future__ import annotations

import datetime as dt
import hashlib
import ssl
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding

from .config import ConfigError, TlsConfig

# TLS 1.2 is allowed only with forward secrecy and AEAD; TLS 1.3 suites are all AEAD.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def server_context(tls: TlsConfig) -> ssl.SSLContext:
    """A context that requires and verifies a client certificate signed by ``tls.ca``.

    Raises :class:`ConfigError` naming the key when a file is missing or unusable.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    # A client's bare TCP FIN ends its stream like close_notify does. Without this,
    # OpenSSL treats it as a fatal error and the session can no longer send the rest
    # of the upstream's reply, nor a clean close_notify.
    ctx.options |= ssl.OP_IGNORE_UNEXPECTED_EOF
    # TLS 1.3 session tickets per full handshake (tls.session_tickets, default 1; OpenSSL's
    # is two): one is enough for a client's next resumption, and each costs CPU on every
    # handshake (OpenSSL 3.0 copies the session through i2d/d2i per ticket, decoding the
    # client's certificate again). 0: none, so no client can resume.
    ctx.num_tickets = tls.session_tickets
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    try:
        ctx.load_verify_locations(cafile=str(tls.ca))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("tls.ca", f"cannot load CA certificates from {tls.ca}: {exc}") from None
    try:
        ctx.load_cert_chain(certfile=str(tls.cert), keyfile=str(tls.key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            "tls.cert", f"cannot load the certificate {tls.cert} with key {tls.key}: {exc}"
        ) from None
    return ctx


def trust_anchors(path: Path) -> tuple[x509.Certificate, ...]:
    """The certificates of a CA bundle (PEM), as a reload reads ``tls.ca``; none if the
    file cannot be read (the reload has already checked it)."""
    try:
        return tuple(x509.load_pem_x509_certificates(path.read_bytes()))
    except (OSError, ValueError):
        return ()


def issued_by_any(der: bytes, anchors: tuple[x509.Certificate, ...], now: dt.datetime) -> bool:
    """Would a client certificate (DER) still be accepted under ``anchors``: issued
    directly by one of them (signature and names), and both within their validity.

    This is what revocation on reload checks for open connections; the handshake of a
    new connection does full chain verification in OpenSSL."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return False
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        return False
    for anchor in anchors:
        if not anchor.not_valid_before_utc <= now <= anchor.not_valid_after_utc:
            continue
        try:
            cert.verify_directly_issued_by(anchor)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return True
    return False


def certificate_facts(path: Path) -> dict[str, Any]:
    """Subject, serial, expiry and SHA-256 fingerprint of the first certificate in a PEM
    file: ``/status`` shows them, so an operator can tell which certificate is loaded."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        return {"path": str(path), "error": str(exc)}
    return {
        "path": str(path),
        "subject": cert.subject.rfc4514_string(),
        "serial": format(cert.serial_number, "x"),
        "not_after": cert.not_valid_after_utc.isoformat().replace("+00:00", "Z"),
        "sha256": hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest(),
    }
