"""What an identity may be, as text (pure): :func:`normalize_identity` turns a spelling
from a certificate or a rule into the identity, or refuses it.

Apart from :mod:`l4proxy.identity` (which reads certificates with cryptography) so that
the config, and with it ``adminctl`` (the container's HEALTHCHECK), loads without
cryptography.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # config imports this module (rules are normalized at load)
    from .config import IdentityCharset


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
