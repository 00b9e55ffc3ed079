"""Fuzzing the PROXY protocol v2 pair, counted: the proxy's encoder (``l4proxy.proxyproto``)
against the lab upstream's decoder (``upstream.proxyproto``: ``parse_v2`` on a buffer, and
``HeaderReader.feed`` on a stream of chunks, which is how the upstream's server calls it).

Inputs per run (Hypothesis ``max_examples``; each test's docstring repeats its count):

* round trip, v4/v6/mixed/zone-id addresses ............ ROUND_TRIP_EXAMPLES
* round trip, no usable addresses (UNSPEC) ............. UNSPEC_EXAMPLES
* identities at the 16-bit body limit .................. LIMIT_EXAMPLES
* any strings in every field (encoder never crashes) ... ANY_FACTS_EXAMPLES
* arbitrary bytes ...................................... ARBITRARY_EXAMPLES
* mutated valid headers (decoder and chunked reader) ... MUTATED_EXAMPLES

The decoder's documented values are :class:`NeedMore`, :class:`Invalid` and
:class:`Header` (``HeaderReader.feed``: :class:`Complete` instead of a header, and
``RuntimeError`` only when fed after the header was decided). Anything else escaping it
(``IndexError``, ``struct.error``, ``UnicodeDecodeError``, ...) fails these tests.
"""

from __future__ import annotations

import ipaddress
import itertools
import struct
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, assume, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from l4proxy import proxyproto as enc
from l4proxy.proxyproto import ClientFacts
from upstream import proxyproto as dec
from upstream.proxyproto import Complete, Header, HeaderReader, Invalid, NeedMore, parse_v2

ROUND_TRIP_EXAMPLES = 2000
UNSPEC_EXAMPLES = 300
LIMIT_EXAMPLES = 200
ANY_FACTS_EXAMPLES = 1000
ARBITRARY_EXAMPLES = 3000
MUTATED_EXAMPLES = 4000

SIG = enc.SIGNATURE
MAX_TOTAL = 16 + 0xFFFF  # the largest header the 16-bit length field can declare
ADDRESS_LENGTHS = {"unspec": 0, "inet": 12, "inet6": 36, "unix": 216}
FAMILY_BYTES = (0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32)

# --- the facts the proxy knows about a client ------------------------------------------------

PORTS = st.integers(0, 65535)
V4 = st.ip_addresses(v=4)
V6 = st.ip_addresses(v=6)
UTF8_TEXT = st.text(st.characters(codec="utf-8"), max_size=40)
ASCII_TEXT = st.text(st.characters(codec="ascii"), max_size=40)
IdentityText = st.text(st.characters(codec="utf-8"), min_size=1, max_size=80)
Ip = ipaddress.IPv4Address | ipaddress.IPv6Address


def as_v6(address: Ip) -> ipaddress.IPv6Address:
    if isinstance(address, ipaddress.IPv4Address):
        return ipaddress.IPv6Address(f"::ffff:{address}")
    return address


@st.composite
def ip_endpoints(draw: st.DrawFn) -> tuple[str, tuple[Ip, int], tuple[Ip, int], str, str]:
    """(kind, (source ip, port), (destination ip, port), source text, destination text)."""
    kind = draw(st.sampled_from(["v4", "v6", "mixed", "zone"]))
    if kind == "v4":
        src, dst = draw(V4), draw(V4)
    elif kind == "v6":
        src, dst = draw(V6), draw(V6)
    elif kind == "mixed":
        src, dst = draw(st.permutations([draw(V4), draw(V6)]))
    else:
        src, dst = draw(V6), draw(V4 | V6)
    sport, dport = draw(PORTS), draw(PORTS)
    src_text, dst_text = str(src), str(dst)
    if kind == "zone":  # the proxy drops an IPv6 zone id ("fe80::1%eth0")
        src_text += "%" + draw(
            st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789"), min_size=1, max_size=8)
        )
    return kind, (src, sport), (dst, dport), src_text, dst_text


connection_ids = st.integers(1, 10**18).map(str) | st.text(
    st.characters(codec="ascii"), min_size=1, max_size=300
)
tls_versions = st.none() | st.sampled_from(["TLSv1.2", "TLSv1.3"]) | ASCII_TEXT
ciphers = st.none() | st.sampled_from(["TLS_AES_256_GCM_SHA384", "ECDHE-RSA-AES128-GCM-SHA256"])
ciphers |= ASCII_TEXT


def expected_unique_id(connection_id: str) -> str:
    """What the decoder shows for the proxy's id: the first 128 bytes, non-ASCII escaped."""
    return connection_id.encode()[: enc.UNIQUE_ID_MAX].decode("ascii", "backslashreplace")


def check_tls_facts(parsed: Header, facts: ClientFacts) -> None:
    """The SSL TLV and the identity say what the facts said."""
    assert parsed.identity == facts.identity
    assert parsed.unique_id == expected_unique_id(facts.connection_id)
    ssl = parsed.ssl
    assert ssl is not None
    flags = dec.PP2_CLIENT_SSL | dec.PP2_CLIENT_CERT_SESS
    if not facts.resumed:
        flags |= dec.PP2_CLIENT_CERT_CONN
    assert ssl.client == flags
    assert ssl.verify == 0
    assert ssl.verified
    # An empty text is not sent at all: it reads back as absent.
    assert ssl.version == (facts.tls_version or None)
    assert ssl.cipher == (facts.cipher or None)
    assert ssl.cn == (facts.common_name or None)
    assert [kind for kind, _ in parsed.tlvs] == [
        dec.PP2_TYPE_UNIQUE_ID,
        dec.PP2_TYPE_SSL,
        dec.PP2_TYPE_IDENTITY,
    ]


@settings(max_examples=ROUND_TRIP_EXAMPLES, deadline=None)
@given(
    ip_endpoints(),
    IdentityText,
    connection_ids,
    tls_versions,
    ciphers,
    st.none() | st.just("same") | UTF8_TEXT,
    st.booleans(),
    st.binary(max_size=32),
)
def test_round_trip_ip_families(
    endpoints: tuple[str, tuple[Ip, int], tuple[Ip, int], str, str],
    identity: str,
    connection_id: str,
    tls_version: str | None,
    cipher: str | None,
    common_name: str | None,
    resumed: bool,
    payload: bytes,
) -> None:
    """ROUND_TRIP_EXAMPLES (2,000) facts with IP endpoints: v4, v6, one of each, and a v6
    source with a zone id; UTF-8 identities; numeric and arbitrary ASCII connection ids
    (longer than 128 bytes too); any ASCII TLS version and cipher; a CN that is the
    identity, another text, or none; resumed or not. The upstream reads back every fact,
    whether the header comes alone, with payload, or one chunk at a time."""
    kind, (src, sport), (dst, dport), src_text, dst_text = endpoints
    event(f"addresses {kind}")
    facts = ClientFacts(
        source=(src_text, sport),
        destination=(dst_text, dport),
        identity=identity,
        connection_id=connection_id,
        tls_version=tls_version,
        cipher=cipher,
        common_name=identity if common_name == "same" else common_name,
        resumed=resumed,
    )
    header = enc.client_header(facts)
    parsed = parse_v2(header + payload)
    assert isinstance(parsed, Header), parsed
    assert parsed.length == len(header)
    assert (parsed.command, parsed.transport) == ("proxy", "stream")
    if kind == "v4":
        assert parsed.family == "inet"
        want_src, want_dst = src, dst
    else:
        assert parsed.family == "inet6"
        want_src, want_dst = as_v6(src), as_v6(dst)
    assert parsed.source is not None
    assert parsed.destination is not None
    assert (ipaddress.ip_address(parsed.source[0]), parsed.source[1]) == (want_src, sport)
    assert (ipaddress.ip_address(parsed.destination[0]), parsed.destination[1]) == (
        want_dst,
        dport,
    )
    check_tls_facts(parsed, facts)
    # The way the upstream's server reads it: chunk by chunk, payload handed back.
    reader = HeaderReader()
    stream = header + payload
    consumed = 0
    result: NeedMore | Invalid | Complete = NeedMore(1)
    while isinstance(result, NeedMore):
        assert consumed < len(header)
        result = reader.feed(stream[consumed : consumed + 7])
        consumed += 7
    assert isinstance(result, Complete)
    assert result.header == parsed
    assert consumed - 7 < len(header) <= consumed
    assert result.payload == stream[len(header) : consumed]


@st.composite
def unusable_endpoints(
    draw: st.DrawFn,
) -> tuple[tuple[str, int] | None, tuple[str, int] | None]:
    """At least one endpoint missing or not an IP address (a name, a Unix path, junk)."""
    ip = (V4 | V6).map(str)
    junk = st.sampled_from(["unix-socket", "localhost", "", "/run/l4.sock"]) | UTF8_TEXT
    usable = st.tuples(ip, PORTS)
    unusable = st.none() | st.tuples(junk.filter(lambda t: enc._ip(t) is None), PORTS)
    pair = draw(st.sampled_from(["src", "dst", "both"]))
    source = draw(unusable if pair in ("src", "both") else usable)
    destination = draw(unusable if pair in ("dst", "both") else usable)
    return source, destination


@settings(max_examples=UNSPEC_EXAMPLES, deadline=None)
@given(unusable_endpoints(), IdentityText, st.integers(1, 10**12).map(str), st.booleans())
def test_round_trip_without_usable_addresses_keeps_the_identity(
    endpoints: tuple[tuple[str, int] | None, tuple[str, int] | None],
    identity: str,
    connection_id: str,
    resumed: bool,
) -> None:
    """UNSPEC_EXAMPLES (300) facts whose source or destination is missing or not an IP.

    The proxy then sends ``PROXY`` with family ``UNSPEC`` *and still its TLVs* (see
    tests/unit/test_proxyproto.py::test_unknown_addresses_send_unspec_with_tlvs_still): the
    identity, connection id and TLS facts are meant for the upstream. The upstream must read
    them back; no addresses is the only loss."""
    source, destination = endpoints
    facts = ClientFacts(
        source=source,
        destination=destination,
        identity=identity,
        connection_id=connection_id,
        tls_version="TLSv1.3",
        cipher="TLS_AES_256_GCM_SHA384",
        common_name=identity,
        resumed=resumed,
    )
    header = enc.client_header(facts)
    assert header[12:14] == b"\x21\x00"
    parsed = parse_v2(header)
    assert isinstance(parsed, Header), parsed
    assert (parsed.command, parsed.family, parsed.length) == ("proxy", "unspec", len(header))
    assert parsed.source is None
    assert parsed.destination is None
    check_tls_facts(parsed, facts)


# --- identities at the limit ----------------------------------------------------------------


def text_of_utf8_size(seed: str, size: int) -> str:
    """A string of exactly ``size`` UTF-8 bytes made of ``seed``'s characters (then 'a's)."""
    out: list[str] = []
    used = 0
    chars = seed or "a"
    i = 0
    while True:
        char = chars[i % len(chars)]
        width = len(char.encode())
        if used + width > size:
            break
        out.append(char)
        used += width
        i += 1
    return "".join(out) + "a" * (size - used)


@settings(max_examples=LIMIT_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(["v4", "v6", "none"]),
    st.text(st.characters(codec="utf-8", min_codepoint=0x80), min_size=1, max_size=8),
    st.integers(-4, 4),
    connection_ids,
    tls_versions,
    st.booleans(),
)
def test_identities_up_to_the_tlv_limit(
    family: str, seed: str, slack: int, connection_id: str, tls_version: str | None, cn: bool
) -> None:
    """LIMIT_EXAMPLES (200) non-ASCII identities sized to the 16-bit length field's limit,
    give or take 4 bytes: up to the limit they read back byte for byte (``Header.length``
    up to 65,551); one byte past it is a ``ValueError`` from the encoder, never a
    truncated or wrapped header."""
    endpoints = {
        "v4": (("192.0.2.1", 1), ("198.51.100.2", 2)),
        "v6": (("2001:db8::1", 1), ("2001:db8::2", 2)),
        "none": (None, None),
    }[family]

    def facts(identity: str) -> ClientFacts:
        return ClientFacts(
            source=endpoints[0],
            destination=endpoints[1],
            identity=identity,
            connection_id=connection_id,
            tls_version=tls_version,
            cipher="TLS_AES_128_GCM_SHA256",
            common_name=identity if cn else None,
            resumed=False,
        )

    # The body without the identity's bytes, to find the largest identity that fits.
    # The CN (if any) is the identity as well: it counts twice, plus its sub-TLV's 3 bytes.
    fixed = len(enc.client_header(facts(""))) - 16 + (3 if cn else 0)
    per_byte = 2 if cn else 1
    size = (0xFFFF - fixed) // per_byte + slack
    assume(size > 0)
    identity = text_of_utf8_size(seed, size)
    event("fits" if slack <= 0 else "one to four bytes too long")
    if slack > 0:
        with pytest.raises(ValueError, match=r"too long|exceeds"):
            enc.client_header(facts(identity))
        return
    header = enc.client_header(facts(identity))
    assert len(header) <= MAX_TOTAL
    parsed = parse_v2(header)
    assert isinstance(parsed, Header), parsed
    assert parsed.length == len(header)
    if family != "none":  # (UNSPEC: see the test above)
        check_tls_facts(parsed, facts(identity))


surrogate_text = st.text(max_size=30)  # any code point, lone surrogates included


@settings(max_examples=ANY_FACTS_EXAMPLES, deadline=None)
@given(
    st.none() | st.tuples(surrogate_text | (V4 | V6).map(str), PORTS),
    st.none() | st.tuples(surrogate_text | (V4 | V6).map(str), PORTS),
    surrogate_text,
    surrogate_text,
    st.none() | surrogate_text,
    st.none() | surrogate_text,
    st.none() | surrogate_text,
    st.booleans(),
)
def test_any_strings_encode_to_a_header_or_a_value_error(
    source: tuple[str, int] | None,
    destination: tuple[str, int] | None,
    identity: str,
    connection_id: str,
    tls_version: str | None,
    cipher: str | None,
    common_name: str | None,
    resumed: bool,
) -> None:
    """ANY_FACTS_EXAMPLES (1,000) facts with any text in every field (non-ASCII, controls,
    lone surrogates). ``client_header`` documents ``ValueError`` as its only exception (the
    proxy's dial path catches exactly that); what it returns, the decoder reads as a header
    or rejects as ``Invalid`` (non-ASCII TLS version or cipher), never an exception."""
    facts = ClientFacts(
        source=source,
        destination=destination,
        identity=identity,
        connection_id=connection_id,
        tls_version=tls_version,
        cipher=cipher,
        common_name=common_name,
        resumed=resumed,
    )
    try:
        header = enc.client_header(facts)
    except ValueError as exc:
        event(f"encoder: {type(exc).__name__}")
        return
    parsed = parse_v2(header)
    event(f"decoder: {type(parsed).__name__}")
    assert isinstance(parsed, Header | Invalid)
    if isinstance(parsed, Header):
        assert parsed.length == len(header)


# --- the decoder on hostile bytes ------------------------------------------------------------


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


@dataclass(frozen=True)
class Built:
    """A valid header, and the offsets of every 16-bit length field in it (the header's,
    each TLV's, each SSL sub-TLV's): the places a mutation makes lengths lie."""

    raw: bytes
    length_fields: tuple[int, ...]


KNOWN_SUBS = (0x21, 0x22, 0x23, 0x24, 0x25)
# Strategies built once: building them inside a draw costs more than the decoding.
QUARTER = st.integers(0, 3)
BOOL = st.booleans()
BYTE = st.integers(0, 255)
WORD = st.integers(0, 0xFFFF)
VERIFY = st.integers(0, 2**32 - 1)
IP_TEXT = (V4 | V6).map(str)
OPTIONAL_ENDPOINT = st.none() | st.tuples(IP_TEXT, PORTS)
ENDPOINT = st.tuples(IP_TEXT, PORTS)
OPTIONAL_UTF8 = st.none() | UTF8_TEXT
COMMAND = st.sampled_from([0x0, 0x1])
FAMILY = st.sampled_from(FAMILY_BYTES)
JUNK_BODY = st.binary(max_size=80)
UNIX_PATH = st.binary(max_size=107).map(lambda b: b.ljust(108, b"\0"))
ADDRESSES = {
    name: st.binary(min_size=size, max_size=size) for name, size in ADDRESS_LENGTHS.items()
}
TOP_KINDS = st.permutations([0x05, 0x20, 0xE0])
SUB_KINDS = st.permutations(KNOWN_SUBS)
UNIQUE_ID = st.binary(max_size=128)
UNKNOWN_SUBS = st.lists(
    st.tuples(BYTE.filter(lambda k: k not in KNOWN_SUBS), st.binary(max_size=12)), max_size=3
)
UNKNOWN_TLVS = st.lists(
    st.tuples(BYTE.filter(lambda k: k not in (0x05, 0x20, 0xE0)), st.binary(max_size=24)),
    max_size=4,
)
FAMILY_NAMES = {0x0: "unspec", 0x1: "inet", 0x2: "inet6", 0x3: "unix"}


def proxys_own_fields(raw: bytes) -> tuple[int, ...]:
    """The length fields of a header the proxy wrote (its TLVs, the SSL sub-TLVs)."""
    fields = [14]
    offset = 16 + {0x00: 0, 0x11: 12, 0x21: 36}[raw[13]]
    while offset < len(raw):
        kind, length = struct.unpack_from("!BH", raw, offset)
        fields.append(offset + 1)
        if kind == dec.PP2_TYPE_SSL:
            sub = offset + 3 + 5
            while sub < offset + 3 + length:
                fields.append(sub + 1)
                sub += 3 + struct.unpack_from("!H", raw, sub + 1)[0]
        offset += 3 + length
    return tuple(fields)


@st.composite
def valid_headers(draw: st.DrawFn) -> Built:
    """Headers the decoder accepts: the proxy's own, and any command, family, unknown
    TLVs, SSL TLVs with nested sub-TLVs, duplicates of unknown types, LOCAL with junk."""
    if draw(QUARTER) == 0:  # a quarter: exactly what the proxy sends
        raw = enc.client_header(
            ClientFacts(
                source=draw(OPTIONAL_ENDPOINT),
                destination=draw(ENDPOINT),
                identity=draw(IdentityText),
                connection_id=draw(connection_ids),
                tls_version=draw(tls_versions),
                cipher=draw(ciphers),
                common_name=draw(OPTIONAL_UTF8),
                resumed=draw(BOOL),
            )
        )
        return Built(raw, proxys_own_fields(raw))

    command = draw(COMMAND)
    family = draw(FAMILY)
    name = FAMILY_NAMES[family >> 4]
    if command == 0x0:
        junk = draw(JUNK_BODY)
        raw = SIG + struct.pack("!BBH", 0x20 | command, family, len(junk)) + junk
        return Built(raw, (14,))
    unix = name == "unix"
    if name == "unspec":
        addresses = b""
    else:
        addresses = draw(UNIX_PATH) + draw(UNIX_PATH) if unix else draw(ADDRESSES[name])
    # Each TLV: (type, value), or (SSL, None) with its value built below from sub-TLVs.
    items: list[tuple[int, bytes | None]] = []
    ssl_subs: list[tuple[int, bytes]] = []
    for kind in draw(TOP_KINDS):
        if not draw(BOOL):
            continue
        if kind == 0x05:
            items.append((kind, draw(UNIQUE_ID)))
        elif kind == 0xE0:
            items.append((kind, draw(UTF8_TEXT).encode()))
        else:
            for sub in draw(SUB_KINDS):
                if draw(BOOL):
                    ssl_subs.append((sub, draw(ASCII_TEXT).encode()))
            ssl_subs += draw(UNKNOWN_SUBS)
            items.append((kind, None))
    items += draw(UNKNOWN_TLVS)
    items = draw(st.permutations(items))
    body = bytearray(addresses)
    fields_in_body: list[int] = []
    for kind, given_value in items:
        fields_in_body.append(len(body) + 1)
        value = given_value
        if value is None:  # the SSL TLV: flags, verify, then the sub-TLVs
            start = len(body)
            value = struct.pack("!BI", draw(BYTE), draw(VERIFY))
            for sub_kind, sub_value in ssl_subs:
                fields_in_body.append(start + 3 + len(value) + 1)
                value += tlv(sub_kind, sub_value)
        body += tlv(kind, value)
    raw = SIG + struct.pack("!BBH", 0x20 | command, family, len(body)) + bytes(body)
    return Built(raw, (14, *(16 + f for f in fields_in_body)))


MUTATIONS = ("truncate", "flip", "lie", "insert", "delete", "append", "fill", "huge")
MUTATION = st.sampled_from(MUTATIONS)
MUTATION_COUNT = st.integers(1, 4)
POSITION = st.integers(0, 1 << 16)  # taken modulo the length: shrinks towards the start
NONZERO_BYTE = st.integers(1, 255)
LIE = st.sampled_from(["0", "1", "5", "-1", "+1", "+3", "max", "any"])
INSERTED = st.binary(min_size=1, max_size=8)
DELETED = st.integers(1, 8)
APPENDED = st.binary(min_size=1, max_size=64)
FILLER = st.sampled_from([b"\0", b"\xff", b"\x20\x00\x05", b"\xe0\xff\xff"])


@st.composite
def mutated(draw: st.DrawFn) -> tuple[bytes, tuple[str, ...]]:
    """A valid header after one to four mutations: cut anywhere, a byte flipped, a length
    field made to lie (0, one off, past the end, 0xFFFF), bytes inserted or deleted,
    garbage appended, filled up to a (lying) declared length, a huge declared length."""
    built = draw(valid_headers())
    data = bytearray(built.raw)
    fields = built.length_fields
    done: list[str] = []
    for _ in range(draw(MUTATION_COUNT)):
        op = draw(MUTATION)
        done.append(op)
        if op == "truncate":
            del data[draw(POSITION) % (len(data) + 1) :]
        elif op == "flip" and data:
            data[draw(POSITION) % len(data)] ^= draw(NONZERO_BYTE)
        elif op == "lie":
            at = fields[draw(POSITION) % len(fields)]
            if at + 2 <= len(data):
                old = int.from_bytes(data[at : at + 2], "big")
                lie = draw(LIE)
                new = {
                    "0": 0,
                    "1": 1,
                    "5": 5,
                    "-1": old - 1,
                    "+1": old + 1,
                    "+3": old + 3,
                    "max": 0xFFFF,
                }.get(lie)
                if new is None:
                    new = draw(WORD)
                data[at : at + 2] = (new % 0x10000).to_bytes(2, "big")
        elif op == "insert":
            at = draw(POSITION) % (len(data) + 1)
            data[at:at] = draw(INSERTED)
        elif op == "delete" and data:
            at = draw(POSITION) % len(data)
            del data[at : at + draw(DELETED)]
        elif op == "append":
            data += draw(APPENDED)
        elif op == "fill" and len(data) >= 16:
            want = 16 + int.from_bytes(data[14:16], "big")
            filler = draw(FILLER)
            if len(data) < want:
                data += filler * ((want - len(data)) // len(filler) + 1)
        elif op == "huge" and len(data) >= 16:
            data[14:16] = b"\xff\xff"
    return bytes(data), tuple(done)


def check_decode(data: bytes) -> None:
    """The decoder's contract on ``data``: a value, consistent with the bytes it saw."""
    result = parse_v2(data)
    assert isinstance(result, NeedMore | Invalid | Header), result
    if currently_in_test_context():
        event(type(result).__name__)
    if isinstance(result, NeedMore):
        assert len(data) < result.needed <= MAX_TOTAL
        if len(data) >= 16:  # all fixed bytes here: what is missing is the declared rest
            assert result.needed == 16 + int.from_bytes(data[14:16], "big")
        return
    if isinstance(result, Invalid):
        assert isinstance(result.reason, str)
        assert result.reason
    else:
        check_header(result, data)
    # Decided once and for all: more bytes change nothing (no look-ahead past the declared
    # length), and the bytes past it were never needed.
    assert parse_v2(data + b"\0\xff junk") == result
    if isinstance(result, Header):
        assert parse_v2(data[: result.length]) == result
        for cut in (result.length - 1, 16, 15, 13, 12, 1):
            if 0 <= cut < result.length:
                assert isinstance(parse_v2(data[:cut]), NeedMore)


def check_header(header: Header, data: bytes) -> None:
    """Every field of ``header`` comes from ``data[:header.length]``, exactly."""
    assert 16 <= header.length <= len(data)
    assert header.length == 16 + int.from_bytes(data[14:16], "big")
    assert data[:12] == SIG
    assert data[12] >> 4 == 2
    if header.command == "local":
        assert header.tlvs == ()
        assert header.source is None
        assert header.ssl is None
        assert header.identity is None
        return
    body = data[16 : header.length]
    need = ADDRESS_LENGTHS[header.family]
    # The TLVs cover the rest of the declared body exactly, in order.
    assert b"".join(tlv(kind, value) for kind, value in header.tlvs) == body[need:]
    if header.family in ("inet", "inet6"):
        assert header.source is not None
        assert header.destination is not None
        width = 4 if header.family == "inet" else 16
        assert ipaddress.ip_address(header.source[0]).packed == body[:width]
        assert ipaddress.ip_address(header.destination[0]).packed == body[width : 2 * width]
        ports = struct.pack("!HH", header.source[1], header.destination[1])
        assert ports == body[2 * width : need]
    elif header.family == "unix":
        assert header.source_path is not None
        assert header.destination_path is not None
        assert b"\0" not in header.source_path + header.destination_path
        assert body[:108].startswith(header.source_path)
        assert body[108:216].startswith(header.destination_path)
    by_kind = {kind: value for kind, value in header.tlvs}
    if header.ssl is not None:
        raw = by_kind[dec.PP2_TYPE_SSL]
        assert raw[0] == header.ssl.client
        assert int.from_bytes(raw[1:5], "big") == header.ssl.verify
        assert b"".join(tlv(k, v) for k, v in header.ssl.tlvs) == raw[5:]
    else:
        assert dec.PP2_TYPE_SSL not in by_kind
    if dec.PP2_TYPE_IDENTITY in by_kind:
        assert header.identity == by_kind[dec.PP2_TYPE_IDENTITY].decode()
    if dec.PP2_TYPE_UNIQUE_ID in by_kind:
        assert header.unique_id is not None


def check_reader(data: bytes, cuts: list[int]) -> None:
    """``HeaderReader`` fed ``data`` in chunks split at ``cuts`` says what ``parse_v2``
    says of the whole, at the first chunk that decides it, and hands back the rest."""
    whole = parse_v2(data)
    bounds = [0, *sorted(set(cuts)), len(data)]
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    reader = HeaderReader()
    fed = 0
    result: NeedMore | Invalid | Complete = NeedMore(1)
    for chunk in chunks:
        result = reader.feed(chunk)
        fed += len(chunk)
        assert reader.buffered == fed
        if not isinstance(result, NeedMore):
            break
        assert result.needed > fed
    if isinstance(whole, NeedMore):
        assert isinstance(result, NeedMore)
        assert result.needed == whole.needed
        return
    if isinstance(whole, Invalid):
        assert isinstance(result, Invalid)
        # The one reason that depends on the chunking: a v1 header is named as such only
        # when its first chunk holds all of "PROXY" (b"P" alone is already invalid).
        v1 = whole.reason.startswith("a PROXY protocol v1") and fed < 5
        assert result == whole or v1, (result, whole)
    else:
        assert isinstance(result, Complete)
        assert result.header == whole
        assert result.payload == data[whole.length : fed]
    with pytest.raises(RuntimeError):
        reader.feed(b"x")


@settings(
    max_examples=ARBITRARY_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    st.sampled_from(["raw", "signature", "fixed"]),
    st.binary(max_size=300),
    st.sampled_from([0x20, 0x21]),
    st.sampled_from(FAMILY_BYTES),
    st.lists(st.integers(0, 320), max_size=5),
)
def test_arbitrary_bytes_decode_to_a_value(
    prefix: str, tail: bytes, command: int, family: int, cuts: list[int]
) -> None:
    """ARBITRARY_EXAMPLES (3,000) byte strings of up to 300 bytes: raw; after the
    signature; or after a valid signature, version/command and family (so the random part
    is the length field and the body). Each is decoded whole, and fed to a
    ``HeaderReader`` split at up to 5 random points."""
    if prefix == "signature":
        tail = SIG + tail
    elif prefix == "fixed":
        tail = SIG + bytes([command, family]) + tail
    check_decode(tail)
    check_reader(tail, [c for c in cuts if c <= len(tail)])


@settings(
    max_examples=MUTATED_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(mutated(), st.lists(POSITION, max_size=6))
def test_mutated_headers_decode_to_a_value(
    case: tuple[bytes, tuple[str, ...]], cuts: list[int]
) -> None:
    """MUTATED_EXAMPLES (4,000) valid headers (a quarter of them the proxy's own) after
    one to four of: truncation anywhere, a flipped byte, a lying length field (the
    header's, a TLV's, an SSL sub-TLV's: 0, one off, past the end, 0xFFFF), inserted or
    deleted bytes, appended garbage, filling up to a huge declared length. Decoded whole
    and fed to a ``HeaderReader`` in up to 7 chunks."""
    data, ops = case
    for op in ops:
        event(f"mutation {op}")
    check_decode(data)
    check_reader(data, [c % (len(data) + 1) for c in cuts])


@pytest.mark.parametrize(
    "data",
    [
        SIG + b"\x21\x11\xff\xff",  # a huge declared length, nothing after it
        SIG + b"\x21\x11\xff\xff" + bytes(0xFFFF),  # ...filled: 21,845 empty TLVs of type 0
        SIG + b"\x21\x21\x00\x24" + bytes(36),  # inet6, addresses only
        SIG + b"\x21\x11\x00\x0f" + bytes(12) + b"\x20\x00",  # a TLV cut in its length
        SIG + b"\x21\x11\x00\x14" + bytes(12) + b"\x20\x00\x05" + b"\x01\0\0\0\0",
        SIG + b"\x21\x11\x00\x17" + bytes(12) + b"\x20\x00\x08\x01\0\0\0\0\x22\xff\xff",
        SIG + b"\x21\x11\x00\x13" + bytes(12) + b"\x20\x00\x04\x01\0\0\0",  # SSL < 5 bytes
        SIG + b"\x21\x11\x00\x11" + bytes(12) + b"\xe0\x00\x02\xc3",  # identity past end
        SIG + b"\x21\x11\x00\x12" + bytes(12) + b"\xe0\x00\x03\xc3\x28\x00",  # bad UTF-8
        SIG + b"\x21\x31\x00\xd8" + b"\xff" * 216,  # unix paths with no NUL
    ],
    ids=[
        "huge-length-empty",
        "huge-length-filled",
        "inet6-addresses-only",
        "tlv-cut-in-length",
        "ssl-no-subs",
        "ssl-sub-past-end",
        "ssl-too-short",
        "identity-past-end",
        "identity-bad-utf8",
        "unix-no-nul",
    ],
)
def test_hand_picked_hostile_headers(data: bytes) -> None:
    """The shapes the brief names, once each, whatever Hypothesis happens to draw."""
    check_decode(data)
    check_reader(data, [1, 13, 15, 17, len(data) - 1])
