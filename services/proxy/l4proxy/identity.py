"""Client identity from a verified client certificate (pure: DER bytes in, value out).

OpenSSL has already verified the chain against ``tls.ca`` (and, for a server verifying
a client, the "SSL client" purpose). This module adds explicit rules on top: the
certificate must carry the clientAuth extended key usage, so a server certificate
(serverAuth only) or a certificate with no EKU at all never authenticates as a client;
and the identity it names must pass :func:`normalize_identity`, whose result is the
identity from then on.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

if TYPE_CHECKING:  # config imports this module (rules are normalized at load)
    from .config import IdentityCharset, IdentitySource


@dataclass(frozen=True, slots=True)
class Identity:
    name: str  # normalized (see normalize_identity)


@dataclass(frozen=True, slots=True)
class NoIdentity:
    reason: str


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why :func:`normalize_identity` refused a text, and the first character at fault."""

    code: str  # identity_empty, identity_has_whitespace, identity_has_control, ...
    position: int | None = None  # index of the character (code point) in the input
    codepoint: int | None = None

    @property
    def reason(self) -> str:
        """Short and machine-friendly, e.g. ``identity_not_ascii: U+0441 at 0``."""
        if self.codepoint is None:
            return self.code
        return f"{self.code}: U+{self.codepoint:04X} at {self.position}"


_CONTROL = frozenset({"Cc", "Cf"})
_UNASSIGNED = frozenset({"Cn", "Co", "Cs"})


def normalize_identity(text: str, charset: IdentityCharset) -> str | Refusal:
    """The one rule that turns a spelling into an identity, for certificates and rules alike.

    The result is THE identity: what authorization compares, the rate limiter's key, the
    ``client`` field of the access log (so the log shows the normalized form, not the
    certificate's spelling), the PROXY v2 TLVs and the metrics labels.

    The text is refused (a :class:`Refusal` naming the first offending character by code
    point and position, never the character itself) when it is empty or has, anywhere:

    * whitespace (``str.isspace()``: space, tab, newline, NBSP, U+001C..U+001F, ...):
      ``identity_has_whitespace``, so ``"client.a "`` is not ``client.a``;
    * a control or format character (Unicode category Cc or Cf: NUL, DEL, C1 controls,
      zero-width and bidi characters): ``identity_has_control``.

    ``charset="ascii"`` (the default of ``tls.identity_charset``): every other character
    must be printable ASCII (0x21-0x7E), else ``identity_not_ascii`` (so ``client.a``
    spelled with a Cyrillic U+0441 for its ``c``, or in fullwidth letters, is refused, not
    a second identity). The identity is the text lower-cased: ``Client.A`` is
    ``client.a``, as X.509 name matching and DNS are case-insensitive.

    ``charset="unicode"``: unassigned, private-use and surrogate code points are refused
    (``identity_has_unassigned``: their case folding could change with Python's Unicode
    version). The identity is ``NFC(casefold(NFC(text)))``: canonically equivalent
    spellings (``e`` + U+0301 and ``é``) and case variants (``Straße``, ``STRASSE``) are
    one identity. Look-alikes from different scripts stay distinct identities: this mode
    does not protect against confusables, which is why ``ascii`` is the default.

    The result is idempotent: normalizing an identity returns it unchanged. An ``ascii``
    identity is also a ``unicode`` identity with the same normalized form.
    """
    if not text:
        return Refusal("identity_empty")
    for position, char in enumerate(text):
        code = ord(char)
        if 0x21 <= code <= 0x7E:
            continue
        if char.isspace():
            return Refusal("identity_has_whitespace", position, code)
        category = unicodedata.category(char)
        if category in _CONTROL:
            return Refusal("identity_has_control", position, code)
        if charset == "ascii":
            return Refusal("identity_not_ascii", position, code)
        if category in _UNASSIGNED:
            return Refusal("identity_has_unassigned", position, code)
    if charset == "ascii":
        return text.lower()
    nfc = unicodedata.normalize("NFC", text)
    return unicodedata.normalize("NFC", nfc.casefold())


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
