"""PROXY protocol version 2 (HAProxy's ``proxy-protocol.txt``, section 2.2), receiving side.

Pure: no sockets, no asyncio. :func:`parse_v2` looks at the bytes received so far and
answers with a value:

* :class:`NeedMore` -- a valid prefix of a header that is not complete yet;
* :class:`Invalid` -- these bytes cannot be a v2 header (decided as early as possible:
  the signature is checked byte by byte, so ``b"H"`` is already invalid);
* :class:`Header` -- a complete header; the payload starts at ``header.length``.

:class:`HeaderReader` wraps it for a stream of chunks and hands back the payload that
followed the header in the same chunks.

Layout: 12-byte signature, version/command byte, family/transport byte, 16-bit big-endian
length of the rest (addresses, then TLVs). For a ``PROXY`` command with an IP or UNIX
family, the addresses are decoded and the TLVs after them are parsed strictly (a TLV that
runs past the end is invalid; unknown types are kept in ``tlvs`` and otherwise ignored).
A ``LOCAL`` command (the sender's own health check) is not about a client: the receiver
discards everything after the 16 fixed bytes (``tlvs`` is empty). A ``PROXY`` command
with the ``UNSPEC`` family has no addresses to use (the spec: the receiver ignores
address information), but its TLVs are read: the proxy sends the client's identity there
even when it could not learn the client's address. ``PP2_TYPE_CRC32C`` is not verified.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
FIXED_LENGTH = 16  # signature, version/command, family/transport, length

PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_SUBTYPE_SSL_SIG_ALG = 0x24
PP2_SUBTYPE_SSL_KEY_ALG = 0x25
PP2_TYPE_NETNS = 0x30
PP2_TYPE_MIN_CUSTOM = 0xE0
PP2_TYPE_IDENTITY = PP2_TYPE_MIN_CUSTOM  # layer4lab: the proxy's verified client identity

PP2_CLIENT_SSL = 0x01
PP2_CLIENT_CERT_CONN = 0x02
PP2_CLIENT_CERT_SESS = 0x04

Command = Literal["local", "proxy"]
Family = Literal["unspec", "inet", "inet6", "unix"]
Transport = Literal["unspec", "stream", "dgram"]
Address = tuple[str, int]
Tlv = tuple[int, bytes]

COMMANDS: dict[int, Command] = {0x0: "local", 0x1: "proxy"}
# The only valid family/transport bytes; the spec says any other must be rejected.
FAMILIES: dict[int, tuple[Family, Transport]] = {
    0x00: ("unspec", "unspec"),
    0x11: ("inet", "stream"),
    0x12: ("inet", "dgram"),
    0x21: ("inet6", "stream"),
    0x22: ("inet6", "dgram"),
    0x31: ("unix", "stream"),
    0x32: ("unix", "dgram"),
}
ADDRESS_LENGTHS: dict[Family, int] = {"unspec": 0, "inet": 12, "inet6": 36, "unix": 216}
UNIX_PATH_LENGTH = 108

# Text sub-TLVs of PP2_TYPE_SSL and their encodings (the spec: US-ASCII, the CN UTF-8).
_SSL_TEXT: dict[int, str] = {
    PP2_SUBTYPE_SSL_VERSION: "ascii",
    PP2_SUBTYPE_SSL_CN: "utf-8",
    PP2_SUBTYPE_SSL_CIPHER: "ascii",
    PP2_SUBTYPE_SSL_SIG_ALG: "ascii",
    PP2_SUBTYPE_SSL_KEY_ALG: "ascii",
}


@dataclass(frozen=True, slots=True)
class NeedMore:
    """The bytes so far are a valid prefix; nothing new can be said before the buffer
    holds ``needed`` bytes in total."""

    needed: int


@dataclass(frozen=True, slots=True)
class Invalid:
    """These bytes cannot be a PROXY protocol v2 header."""

    reason: str


@dataclass(frozen=True, slots=True)
class SslInfo:
    """The ``PP2_TYPE_SSL`` TLV: how the client connected to the sender."""

    client: int  # PP2_CLIENT_* flags
    verify: int  # 0: the client presented a certificate and it was verified
    version: str | None = None
    cn: str | None = None
    cipher: str | None = None
    sig_alg: str | None = None
    key_alg: str | None = None
    tlvs: tuple[Tlv, ...] = ()  # every sub-TLV, in order, known or not

    @property
    def verified(self) -> bool:
        """A client certificate was presented and verified."""
        certificate = self.client & (PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS)
        return self.verify == 0 and bool(certificate)


@dataclass(frozen=True, slots=True)
class Header:
    """A complete v2 header. ``length`` is its size in bytes (the 16 fixed bytes
    included): the payload starts at that offset."""

    command: Command
    family: Family
    transport: Transport
    length: int
    source: Address | None = None  # inet / inet6 with PROXY: (ip, port), IPv6 compressed
    destination: Address | None = None
    source_path: bytes | None = None  # unix with PROXY: the path, up to its first NUL
    destination_path: bytes | None = None
    tlvs: tuple[Tlv, ...] = ()  # every top-level TLV, in order, known or not
    ssl: SslInfo | None = None
    unique_id: str | None = None  # PP2_TYPE_UNIQUE_ID (opaque bytes; non-ASCII escaped)
    identity: str | None = None  # see identity_of()


Parsed = NeedMore | Invalid | Header


@dataclass(frozen=True, slots=True)
class Complete:
    """:meth:`HeaderReader.feed`: the header, and the payload received after it so far."""

    header: Header
    payload: bytes


def identity_of(custom: str | None, ssl: SslInfo | None) -> str | None:
    """The client identity to log: layer4lab's ``0xE0`` TLV if present, else the
    ``SSL_CN`` sub-TLV when the SSL TLV says the certificate was verified, else none."""
    if custom is not None:
        return custom
    if ssl is not None and ssl.verify == 0:
        return ssl.cn
    return None


def parse_v2(buffer: bytes | bytearray) -> Parsed:
    """Parse the PROXY v2 header at the start of ``buffer`` (which may hold payload after it)."""
    head = bytes(buffer[:FIXED_LENGTH])
    size = len(head)
    signature = head[: len(SIGNATURE)]
    if not SIGNATURE.startswith(signature):
        return Invalid(_signature_reason(head))
    if size <= len(SIGNATURE):
        return NeedMore(size + 1)
    version, command = head[12] >> 4, head[12] & 0x0F
    if version != 2:
        return Invalid(f"unsupported version {version} (only version 2 is accepted)")
    if command not in COMMANDS:
        return Invalid(f"unknown command 0x{command:x}")
    if size < 14:
        return NeedMore(14)
    if head[13] not in FAMILIES:
        return Invalid(f"unknown address family/transport 0x{head[13]:02x}")
    if size < FIXED_LENGTH:
        return NeedMore(FIXED_LENGTH)
    total = FIXED_LENGTH + int.from_bytes(head[14:16], "big")
    if len(buffer) < total:
        return NeedMore(total)
    family, transport = FAMILIES[head[13]]
    header = Header(COMMANDS[command], family, transport, total)
    if header.command == "local":
        return header  # not a client's connection: nothing after the fixed bytes counts
    return _parse_body(header, bytes(buffer[FIXED_LENGTH:total]))


class HeaderReader:
    """Incremental decoding over a stream of chunks.

    :meth:`feed` answers :class:`NeedMore` until the header is complete, then
    :class:`Complete` (the header and the payload bytes that followed it in what was fed),
    or :class:`Invalid`. Feeding after that is a bug (``RuntimeError``).
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._needed = 1
        self.done = False

    @property
    def buffered(self) -> int:
        """Bytes fed so far (the header's, and any payload after it)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> NeedMore | Invalid | Complete:
        if self.done:
            raise RuntimeError("HeaderReader.feed() after the header was decided")
        self._buffer += data
        if len(self._buffer) < self._needed:
            return NeedMore(self._needed)
        result = parse_v2(self._buffer)
        if isinstance(result, NeedMore):
            self._needed = result.needed
            return result
        self.done = True
        if isinstance(result, Invalid):
            return result
        return Complete(result, bytes(self._buffer[result.length :]))


# --- the parts ----------------------------------------------------------------------------


def _signature_reason(head: bytes) -> str:
    if head.startswith(b"PROXY"):
        return "a PROXY protocol v1 (text) header; only v2 is accepted"
    differs = next(i for i, (a, b) in enumerate(zip(head, SIGNATURE, strict=False)) if a != b)
    return f"not a PROXY protocol v2 header (signature differs at byte {differs})"


def _parse_body(header: Header, body: bytes) -> Header | Invalid:
    """Addresses and TLVs of a PROXY command (no addresses for the unspec family)."""
    family = header.family
    need = ADDRESS_LENGTHS[family]
    if len(body) < need:
        return Invalid(f"address block too short for {family}: {len(body)} < {need} bytes")
    source: Address | None = None
    destination: Address | None = None
    source_path: bytes | None = None
    destination_path: bytes | None = None
    if family == "unspec":
        pass  # no address block: the TLVs start at once
    elif family == "unix":
        source_path = body[:UNIX_PATH_LENGTH].split(b"\0", 1)[0]
        destination_path = body[UNIX_PATH_LENGTH:need].split(b"\0", 1)[0]
    else:
        width = 4 if family == "inet" else 16
        ports = body[2 * width : need]
        source = (_ip(body[:width]), int.from_bytes(ports[:2], "big"))
        destination = (_ip(body[width : 2 * width]), int.from_bytes(ports[2:], "big"))
    tlvs = _split_tlvs(body[need:], "TLV")
    if isinstance(tlvs, Invalid):
        return tlvs
    known = _known_tlvs(tlvs)
    if isinstance(known, Invalid):
        return known
    unique_id, ssl, custom = known
    return Header(
        command=header.command,
        family=family,
        transport=header.transport,
        length=header.length,
        source=source,
        destination=destination,
        source_path=source_path,
        destination_path=destination_path,
        tlvs=tlvs,
        ssl=ssl,
        unique_id=unique_id,
        identity=identity_of(custom, ssl),
    )


def _ip(raw: bytes) -> str:
    """``ipaddress``'s textual form (IPv6 compressed)."""
    address = ipaddress.IPv4Address(raw) if len(raw) == 4 else ipaddress.IPv6Address(raw)
    return str(address)


def _split_tlvs(data: bytes, what: str) -> tuple[Tlv, ...] | Invalid:
    """Type (1 byte), length (2 bytes, big-endian), value -- until the end of ``data``."""
    found: list[Tlv] = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < 3:
            left = len(data) - offset
            return Invalid(f"truncated {what} at offset {offset}: {left} byte(s) left")
        kind = data[offset]
        length = int.from_bytes(data[offset + 1 : offset + 3], "big")
        start, end = offset + 3, offset + 3 + length
        if end > len(data):
            return Invalid(
                f"{what} 0x{kind:02x} runs past the end: {length} bytes declared, "
                f"{len(data) - start} left"
            )
        found.append((kind, data[start:end]))
        offset = end
    return tuple(found)


def _known_tlvs(
    tlvs: tuple[Tlv, ...],
) -> tuple[str | None, SslInfo | None, str | None] | Invalid:
    """The unique id, SSL information and layer4lab identity among ``tlvs``.

    Each may appear at most once: two identities would be ambiguous.
    """
    unique_id: str | None = None
    ssl: SslInfo | None = None
    custom: str | None = None
    seen: set[int] = set()
    for kind, value in tlvs:
        if kind not in (PP2_TYPE_UNIQUE_ID, PP2_TYPE_SSL, PP2_TYPE_IDENTITY):
            continue  # unknown or unused here: skipped
        if kind in seen:
            return Invalid(f"duplicate TLV 0x{kind:02x}")
        seen.add(kind)
        if kind == PP2_TYPE_UNIQUE_ID:
            unique_id = value.decode("ascii", errors="backslashreplace")
        elif kind == PP2_TYPE_SSL:
            parsed = _parse_ssl(value)
            if isinstance(parsed, Invalid):
                return parsed
            ssl = parsed
        else:
            try:
                custom = value.decode("utf-8")
            except UnicodeDecodeError:
                return Invalid(f"identity TLV 0x{kind:02x} is not valid UTF-8")
    return unique_id, ssl, custom


def _parse_ssl(value: bytes) -> SslInfo | Invalid:
    """``client`` (1 byte), ``verify`` (4 bytes, big-endian), then sub-TLVs."""
    if len(value) < 5:
        return Invalid(f"SSL TLV too short: {len(value)} < 5 bytes")
    subs = _split_tlvs(value[5:], "SSL sub-TLV")
    if isinstance(subs, Invalid):
        return subs
    texts: dict[int, str] = {}
    for kind, raw in subs:
        encoding = _SSL_TEXT.get(kind)
        if encoding is None:
            continue
        if kind in texts:
            return Invalid(f"duplicate SSL sub-TLV 0x{kind:02x}")
        try:
            texts[kind] = raw.decode(encoding)
        except UnicodeDecodeError:
            return Invalid(f"SSL sub-TLV 0x{kind:02x} is not valid {encoding}")
    return SslInfo(
        client=value[0],
        verify=int.from_bytes(value[1:5], "big"),
        version=texts.get(PP2_SUBTYPE_SSL_VERSION),
        cn=texts.get(PP2_SUBTYPE_SSL_CN),
        cipher=texts.get(PP2_SUBTYPE_SSL_CIPHER),
        sig_alg=texts.get(PP2_SUBTYPE_SSL_SIG_ALG),
        key_alg=texts.get(PP2_SUBTYPE_SSL_KEY_ALG),
        tlvs=subs,
    )
