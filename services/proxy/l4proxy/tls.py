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


# --- session ticket keys shared by workers (workers: N) ---------------------------------

TICKET_KEYS_SIZE = 80  # OpenSSL's ticket key: 16 bytes name, 32 HMAC, 32 AES
_GET_TICKET_KEYS = 58  # SSL_CTRL_GET_TLSEXT_TICKET_KEYS
_SET_TICKET_KEYS = 59  # SSL_CTRL_SET_TLSEXT_TICKET_KEYS


def set_ticket_keys(context: ssl.SSLContext, keys: bytes) -> str | None:
    """Give ``context`` the TLS session ticket keys ``keys`` (the supervisor's, the same
    for every worker), so a ticket one worker issued resumes on any of them. Python's
    ``ssl`` has no call for it: this reaches OpenSSL's ``SSL_CTX_ctrl`` through ctypes,
    finding the ``SSL_CTX`` where CPython keeps it (the first field after the object
    header) and proving it is that one (its options read back as ``context.options``)
    before writing, then reading the keys back. Returns None when the keys are set,
    else why not (the context keeps its own keys: resumption then works only on the
    worker that issued the ticket)."""
    if len(keys) != TICKET_KEYS_SIZE:
        return f"ticket keys must be {TICKET_KEYS_SIZE} bytes, not {len(keys)}"
    try:
        import _ssl  # noqa: PLC0415 - only workers need it
        import ctypes  # noqa: PLC0415

        library = ctypes.CDLL(getattr(_ssl, "__file__", None))
        ctrl = library.SSL_CTX_ctrl
        ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        ctrl.restype = ctypes.c_long
        options = library.SSL_CTX_get_options
        options.argtypes = [ctypes.c_void_p]
        options.restype = ctypes.c_uint64
        header = 2 * ctypes.sizeof(ctypes.c_ssize_t)  # ob_refcnt, ob_type
        pointer = ctypes.c_void_p.from_address(id(context) + header).value
        if not pointer or options(pointer) != int(context.options):
            return "this Python keeps its SSL_CTX elsewhere"
        if ctrl(pointer, _SET_TICKET_KEYS, TICKET_KEYS_SIZE, keys) != 1:
            return "OpenSSL refused the keys"
        check = ctypes.create_string_buffer(TICKET_KEYS_SIZE)
        if ctrl(pointer, _GET_TICKET_KEYS, TICKET_KEYS_SIZE, check) != 1 or check.raw != keys:
            return "the keys did not read back"
    except (OSError, AttributeError, ValueError) as exc:
        return f"OpenSSL's SSL_CTX_ctrl is out of reach: {exc}"
    return None
