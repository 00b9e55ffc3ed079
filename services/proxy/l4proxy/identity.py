"""Client identity from a verified client certificate (pure: DER bytes in, value out).

OpenSSL has already verified the chain against ``tls.ca`` (and, for a server verifying
a client, the "SSL client" purpose). This module adds explicit rules on top: the
certificate must carry the clientAuth extended key usage, so a server certificate
(serverAuth only) or a certificate with no EKU at all never authenticates as a client;
and the identity it names must pass :func:`normalize_identity`, whose result is the
identity from then on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# The text rule lives in .names (config uses it without loading cryptography).
from .names import Refusal as Refusal  # noqa: PLC0414
from .names import normalize_identity as normalize_identity  # noqa: PLC0414

if TYPE_CHECKING:
    from .config import IdentityCharset, IdentitySource


@dataclass(frozen=True, slots=True)
class Identity:
    name: str  # normalized (see normalize_identity)


@dataclass(frozen=True, slots=True)
class NoIdentity:
    reason: str


def identity_from_der(
    der: bytes, source: IdentitySource, charset: IdentityCharset = "ascii"
) -> Identity | NoIdentity:
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return NoIdentity("unparsable_certificate")
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return NoIdentity("client_auth_eku_missing")
    if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        return NoIdentity("client_auth_eku_missing")
    if source == "cn":
        names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    else:
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return NoIdentity(f"no_{source}")
        kind = x509.UniformResourceIdentifier if source == "san_uri" else x509.DNSName
        names = list(san.get_values_for_type(kind))
    if len(names) != 1 or not isinstance(names[0], str) or not names[0]:
        # Zero or several candidates: refuse rather than guess which one is the identity.
        return NoIdentity(f"no_{source}" if not names else f"ambiguous_{source}")
    identity = normalize_identity(names[0], charset)
    if isinstance(identity, Refusal):
        return NoIdentity(identity.reason)
    return Identity(identity)


class IdentityCache:
    """Memoises :func:`identity_from_der` by certificate bytes (bounded)."""

    def __init__(
        self, source: IdentitySource, *, charset: IdentityCharset = "ascii", limit: int = 4096
    ) -> None:
        self.source: IdentitySource = source
        self.charset: IdentityCharset = charset
        self.limit = limit
        self._entries: dict[bytes, Identity | NoIdentity] = {}

    def lookup(self, der: bytes) -> Identity | NoIdentity:
        hit = self._entries.get(der)
        if hit is None:
            hit = identity_from_der(der, self.source, self.charset)
            if len(self._entries) >= self.limit:
                self._entries.clear()
            self._entries[der] = hit
        return hit
