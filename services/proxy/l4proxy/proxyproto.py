"""PROXY protocol version 2 headers towards upstreams (pure: values in, bytes out).

Byte layout (HAProxy's proxy-protocol.txt, section 2.2)::

    12 bytes  signature  0D 0A 0D 0A 00 0D 0A 51 55 49 54 0A
     1 byte   version (high nibble, 2) | command (low nibble: 0 LOCAL, 1 PROXY)
     1 byte   address family (high nibble: 0 UNSPEC, 1 INET, 2 INET6)
              | transport (low nibble: 1 STREAM)
     2 bytes  length of what follows, big-endian
     ...      addresses: INET  src(4) dst(4) sport(2) dport(2)
                         INET6 src(16) dst(16) sport(2) dport(2)
     ...      TLVs: type(1) length(2, big-endian) value

The TLVs we send for a proxied client:

* ``PP2_TYPE_UNIQUE_ID`` (0x05): the proxy's connection id, as in its access log.
* ``PP2_TYPE_SSL`` (0x20): client flags, verify result (0: the certificate was verified)
  and the sub-TLVs ``SSL_VERSION`` (0x21), ``SSL_CN`` (0x22, only when the identity is
  the certificate's CN) and ``SSL_CIPHER`` (0x23).
* ``PP2_TYPE_LAYER4LAB_IDENTITY`` (0xE0, the first custom type): the verified client
  identity, UTF-8, whichever certificate field it came from.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence
from dataclasses import dataclass

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
VERSION = 0x20
CMD_LOCAL = 0x00
CMD_PROXY = 0x01
AF_UNSPEC = 0x00
AF_INET = 0x10
AF_INET6 = 0x20
STREAM = 0x01

PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_TYPE_LAYER4LAB_IDENTITY = 0xE0

PP2_CLIENT_SSL = 0x01
PP2_CLIENT_CERT_CONN = 0x02
PP2_CLIENT_CERT_SESS = 0x04

MAX_BODY = 0xFFFF  # the length field is 16 bits
UNIQUE_ID_MAX = 128  # the specification's limit for PP2_TYPE_UNIQUE_ID

Endpoint = tuple[str, int]
Tlv = tuple[int, bytes]


@dataclass(frozen=True, slots=True)
class ClientFacts:
    """What the proxy knows about one verified client connection."""

    source: Endpoint | None  # the client's address as the proxy saw it
    destination: Endpoint | None  # the proxy's address the client connected to
    identity: str
    connection_id: str
    tls_version: str | None = None
    cipher: str | None = None
    common_name: str | None = None  # only when the identity is the certificate's CN
    resumed: bool = False  # TLS session resumption: the certificate came with the session


def tlv(kind: int, value: bytes) -> bytes:
    if not 0 <= kind <= 0xFF:
        raise ValueError(f"TLV type {kind} does not fit in one byte")
    if len(value) > MAX_BODY:
        raise ValueError(f"TLV 0x{kind:02x} value of {len(value)} bytes is too long")
    return struct.pack("!BH", kind, len(value)) + value


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.partition("%")[0])  # drop an IPv6 zone id
    except ValueError:
        return None


def _as_v6(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    if isinstance(address, ipaddress.IPv4Address):
        return ipaddress.IPv6Address(f"::ffff:{address}")
    return address


def address_block(source: Endpoint | None, destination: Endpoint | None) -> tuple[int, bytes]:
    """The family byte and address block. Mixed families become IPv4-mapped IPv6; an
    endpoint that is not an IP address (or is missing) makes the family UNSPEC."""
    if source is None or destination is None:
        return AF_UNSPEC, b""
    src, dst = _ip(source[0]), _ip(destination[0])
    if src is None or dst is None:
        return AF_UNSPEC, b""
    ports = struct.pack("!HH", source[1], destination[1])
    if isinstance(src, ipaddress.IPv4Address) and isinstance(dst, ipaddress.IPv4Address):
        return AF_INET | STREAM, src.packed + dst.packed + ports
    return AF_INET6 | STREAM, _as_v6(src).packed + _as_v6(dst).packed + ports


def encode(command: int, family: int, addresses: bytes, tlvs: Sequence[Tlv] = ()) -> bytes:
    body = addresses + b"".join(tlv(kind, value) for kind, value in tlvs)
    if len(body) > MAX_BODY:
        raise ValueError(f"PROXY v2 header body of {len(body)} bytes exceeds {MAX_BODY}")
    return SIGNATURE + struct.pack("!BBH", VERSION | command, family, len(body)) + body


def local_header() -> bytes:
    """A LOCAL header: the proxy's own connection (a health check), no client behind it."""
    return encode(CMD_LOCAL, AF_UNSPEC, b"")


def ssl_tlv_value(facts: ClientFacts) -> bytes:
    flags = PP2_CLIENT_SSL | PP2_CLIENT_CERT_SESS
    if not facts.resumed:
        flags |= PP2_CLIENT_CERT_CONN
    subs = [
        (PP2_SUBTYPE_SSL_VERSION, facts.tls_version),
        (PP2_SUBTYPE_SSL_CN, facts.common_name),
        (PP2_SUBTYPE_SSL_CIPHER, facts.cipher),
    ]
    verify = 0  # the proxy only forwards clients whose certificate verified
    return struct.pack("!BI", flags, verify) + b"".join(
        tlv(kind, value.encode()) for kind, value in subs if value
    )


def client_header(facts: ClientFacts) -> bytes:
    """The PROXY header for one proxied, verified client connection.

    Raises ``ValueError`` only if the TLVs cannot fit (an identity of tens of KiB)."""
    family, addresses = address_block(facts.source, facts.destination)
    tlvs: list[Tlv] = [
        (PP2_TYPE_UNIQUE_ID, facts.connection_id.encode()[:UNIQUE_ID_MAX]),
        (PP2_TYPE_SSL, ssl_tlv_value(facts)),
        (PP2_TYPE_LAYER4LAB_IDENTITY, facts.identity.encode()),
    ]
    return encode(CMD_PROXY, family, addresses, tlvs)
