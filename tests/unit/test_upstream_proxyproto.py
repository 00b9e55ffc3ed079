"""Unit tests for upstream.proxyproto: PROXY protocol v2 headers built byte by byte.

The layouts follow HAProxy's proxy-protocol.txt, section 2.2; the tiny encoder below is
written from the spec, independently of the decoder under test.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from upstream.proxyproto import (
    FAMILIES,
    SIGNATURE,
    Command,
    Complete,
    Family,
    Header,
    HeaderReader,
    Invalid,
    NeedMore,
    SslInfo,
    Transport,
    parse_v2,
)

SIG = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"
LOCAL, PROXY = 0x0, 0x1
UNSPEC, TCP4, UDP4, TCP6, UDP6, UNIX_STREAM, UNIX_DGRAM = 0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32
KNOWN_TYPES = {0x05, 0x20, 0xE0}
KNOWN_SSL_SUBTYPES = {0x21, 0x22, 0x23, 0x24, 0x25}


# --- a tiny encoder, from the spec -----------------------------------------------------------


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def v2(
    command: int, family: int, body: bytes = b"", *, version: int = 2, length: int | None = None
) -> bytes:
    size = len(body) if length is None else length
    return SIG + struct.pack("!BBH", (version << 4) | command, family, size) + body


def inet(src: str, sport: int, dst: str, dport: int) -> bytes:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    return s.packed + d.packed + struct.pack("!HH", sport, dport)


def unix(src: bytes, dst: bytes) -> bytes:
    return src.ljust(108, b"\0") + dst.ljust(108, b"\0")


def ssl_value(client: int, verify: int, subs: list[tuple[int, bytes]]) -> bytes:
    return struct.pack("!BI", client, verify) + b"".join(tlv(k, v) for k, v in subs)


SSL_SUBS = [
    (0x21, b"TLSv1.3"),
    (0x22, b"client.b"),
    (0x23, b"TLS_AES_128_GCM_SHA256"),
    (0x24, b"ecdsa-with-SHA256"),
    (0x25, b"EC256"),
]
FULL_TLVS = [
    (0x05, b"c-000042"),
    (0x20, ssl_value(0x07, 0, SSL_SUBS)),
    (0xE0, "spiffe://lab/client-b \u00e9".encode()),
]
FULL_BODY = inet("192.0.2.10", 54321, "198.51.100.1", 8000) + b"".join(
    tlv(k, v) for k, v in FULL_TLVS
)
FULL = v2(PROXY, TCP4, FULL_BODY)


# --- complete headers ------------------------------------------------------------------------


def test_signature_matches_the_spec() -> None:
    assert SIGNATURE == SIG


def test_ipv4_proxy_with_every_tlv_the_proxy_sends() -> None:
    header = parse_v2(FULL + b"Hello from x\n")
    assert header == Header(
        command="proxy",
        family="inet",
        transport="stream",
        length=len(FULL),
        source=("192.0.2.10", 54321),
        destination=("198.51.100.1", 8000),
        tlvs=tuple(FULL_TLVS),
        ssl=SslInfo(
            client=0x07,
            verify=0,
            version="TLSv1.3",
            cn="client.b",
            cipher="TLS_AES_128_GCM_SHA256",
            sig_alg="ecdsa-with-SHA256",
            key_alg="EC256",
            tlvs=tuple(SSL_SUBS),
        ),
        unique_id="c-000042",
        identity="spiffe://lab/client-b \u00e9",
    )
    assert isinstance(header, Header)
    assert header.length == 16 + 12 + sum(3 + len(v) for _, v in FULL_TLVS)
    assert header.ssl is not None
    assert header.ssl.verified


def test_ipv6_addresses_are_compressed() -> None:
    raw = v2(PROXY, TCP6, inet("2001:db8:0:0:0:0:0:1", 443, "fe80:0000::0001:0002", 8000))
    header = parse_v2(raw)
    assert isinstance(header, Header)
    assert (header.family, header.transport, header.length) == ("inet6", "stream", 16 + 36)
    assert header.source == ("2001:db8::1", 443)
    assert header.destination == ("fe80::1:2", 8000)
    assert (header.tlvs, header.ssl, header.identity, header.unique_id) == ((), None, None, None)


def test_ipv4_mapped_ipv6_is_in_ipaddress_text_form() -> None:
    mapped = ipaddress.IPv6Address("::ffff:10.0.0.5")
    header = parse_v2(v2(PROXY, TCP6, inet(str(mapped), 50112, "::1", 8443)))
    assert isinstance(header, Header)
    # "::ffff:a00:5" before Python 3.13, "::ffff:10.0.0.5" from 3.13: whatever str() gives.
    assert header.source == (str(mapped), 50112)


def test_udp_families_decode_like_tcp() -> None:
    header = parse_v2(v2(PROXY, UDP4, inet("10.0.0.1", 53, "10.0.0.2", 5353)))
    assert isinstance(header, Header)
    assert (header.family, header.transport, header.source) == ("inet", "dgram", ("10.0.0.1", 53))


def test_unix_paths_end_at_the_first_nul() -> None:
    header = parse_v2(v2(PROXY, UNIX_STREAM, unix(b"/run/client.sock", b"/run/up.sock")))
    assert isinstance(header, Header)
    assert (header.family, header.length) == ("unix", 16 + 216)
    assert (header.source_path, header.destination_path) == (b"/run/client.sock", b"/run/up.sock")
    assert header.source is None


def test_local_is_a_health_check_and_its_block_is_ignored() -> None:
    assert parse_v2(v2(LOCAL, UNSPEC)) == Header("local", "unspec", "unspec", 16)
    # LOCAL: the spec says discard the whole block, family included -- even if malformed.
    junk = b"\xff\x00\x09"
    assert parse_v2(v2(LOCAL, TCP4, junk) + b"payload") == Header("local", "inet", "stream", 19)


def test_unspec_proxy_has_no_addresses_but_its_tlvs_count() -> None:
    """The proxy sends UNSPEC when it could not learn the client's address; the
    identity it sends along must still arrive. (LOCAL, above, discards everything.)"""
    body = tlv(0xE0, b"client.a") + tlv(0x05, b"7")
    header = parse_v2(v2(PROXY, UNSPEC, body))
    assert isinstance(header, Header)
    assert (header.family, header.source, header.identity, header.unique_id) == (
        "unspec",
        None,
        "client.a",
        "7",
    )
    # Bytes that are no TLV are invalid here, as after any other family's addresses.
    assert isinstance(parse_v2(v2(PROXY, UNSPEC, b"\x01\x02\x03")), Invalid)


def test_unknown_tlvs_are_skipped_but_kept() -> None:
    tlvs = [(0x04, b"\0" * 7), (0x01, b"h2"), (0x30, b"netns"), (0xEE, b""), (0xE0, b"client.a")]
    body = inet("127.0.0.1", 1, "127.0.0.2", 2) + b"".join(tlv(k, v) for k, v in tlvs)
    header = parse_v2(v2(PROXY, TCP4, body))
    assert isinstance(header, Header)
    assert header.tlvs == tuple(tlvs)
    assert header.identity == "client.a"


def test_unknown_ssl_subtlvs_are_skipped() -> None:
    ssl = ssl_value(0x01, 0, [(0x2F, b"\xff\xfe"), (0x22, b"client.c")])
    header = parse_v2(v2(PROXY, TCP4, inet("1.2.3.4", 5, "6.7.8.9", 10) + tlv(0x20, ssl)))
    assert isinstance(header, Header)
    assert header.ssl is not None
    assert (header.ssl.cn, header.ssl.version, header.ssl.tlvs[0]) == (
        "client.c",
        None,
        (0x2F, b"\xff\xfe"),
    )


@pytest.mark.parametrize(
    ("tlvs", "identity"),
    [
        ([(0xE0, b"from-e0"), (0x20, ssl_value(0x07, 0, [(0x22, b"cn")]))], "from-e0"),
        ([(0x20, ssl_value(0x07, 0, [(0x22, b"cn")]))], "cn"),
        # A CN the sender did not verify is not an identity.
        ([(0x20, ssl_value(0x01, 1, [(0x22, b"cn")]))], None),
        ([(0x20, ssl_value(0x07, 0, [(0x21, b"TLSv1.3")]))], None),
        ([(0x05, b"id")], None),
    ],
)
def test_identity_is_e0_else_verified_cn(
    tlvs: list[tuple[int, bytes]], identity: str | None
) -> None:
    body = inet("1.2.3.4", 5, "6.7.8.9", 10) + b"".join(tlv(k, v) for k, v in tlvs)
    header = parse_v2(v2(PROXY, TCP4, body))
    assert isinstance(header, Header)
    assert header.identity == identity


def test_unique_id_is_opaque() -> None:
    body = inet("1.2.3.4", 5, "6.7.8.9", 10) + tlv(0x05, b"ab\xff")
    header = parse_v2(v2(PROXY, TCP4, body))
    assert isinstance(header, Header)
    assert header.unique_id == "ab\\xff"


# --- incomplete and invalid ------------------------------------------------------------------


def test_every_prefix_needs_more() -> None:
    for size in range(len(FULL)):
        result = parse_v2(FULL[:size])
        assert isinstance(result, NeedMore), (size, result)
        assert size < result.needed <= len(FULL)
    assert parse_v2(FULL[:16]) == NeedMore(len(FULL))


@pytest.mark.parametrize("index", range(12))
def test_signature_mismatch_is_invalid_at_the_first_differing_byte(index: int) -> None:
    wrong = bytes([SIG[index] ^ 0x20])
    result = parse_v2(SIG[:index] + wrong)
    assert isinstance(result, Invalid)
    assert f"byte {index}" in result.reason


def test_a_plain_client_is_rejected_at_its_first_byte() -> None:
    assert isinstance(parse_v2(b"H"), Invalid)
    assert isinstance(parse_v2(b"Hello\n"), Invalid)
    v1 = parse_v2(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n")
    assert isinstance(v1, Invalid)
    assert "v1" in v1.reason


@pytest.mark.parametrize("ver_cmd", [0x11, 0x31, 0x01, 0xF1, 0x22, 0x2F])
def test_bad_version_or_command_is_invalid_at_byte_13(ver_cmd: int) -> None:
    result = parse_v2(SIG + bytes([ver_cmd]))
    assert isinstance(result, Invalid), result


@pytest.mark.parametrize("family", [0x01, 0x10, 0x13, 0x23, 0x30, 0x41, 0xFF])
def test_bad_family_or_transport_is_invalid_at_byte_14(family: int) -> None:
    result = parse_v2(SIG + bytes([0x21, family]))
    assert isinstance(result, Invalid), result
    assert f"0x{family:02x}" in result.reason


@pytest.mark.parametrize(
    ("family", "length"), [(TCP4, 0), (TCP4, 11), (TCP6, 12), (TCP6, 35), (UNIX_DGRAM, 215)]
)
def test_short_address_block_is_invalid(family: int, length: int) -> None:
    result = parse_v2(v2(PROXY, family, b"\x01" * length))
    assert isinstance(result, Invalid)
    assert "address block too short" in result.reason


ADDR = inet("1.2.3.4", 5, "6.7.8.9", 10)


@pytest.mark.parametrize(
    ("after_addresses", "words"),
    [
        (b"\x05", "truncated TLV"),
        (b"\x05\x00", "truncated TLV"),
        (b"\x05\x00\x04abc", "runs past the end"),
        (tlv(0x05, b"ok") + b"\xe0\x00\x09x", "runs past the end"),
        (tlv(0x20, b"\x07\x00\x00\x00"), "SSL TLV too short"),
        (tlv(0x20, ssl_value(7, 0, []) + b"\x22\x00"), "truncated SSL sub-TLV"),
        (tlv(0x20, ssl_value(7, 0, []) + b"\x22\x00\x05abc"), "SSL sub-TLV 0x22 runs past"),
        (tlv(0xE0, b"\xc3\x28"), "not valid UTF-8"),
        (tlv(0x20, ssl_value(7, 0, [(0x22, b"\xff")])), "0x22 is not valid utf-8"),
        (tlv(0x20, ssl_value(7, 0, [(0x21, "TLSv1.3\u00e9".encode())])), "not valid ascii"),
        (tlv(0xE0, b"a") + tlv(0xE0, b"b"), "duplicate TLV 0xe0"),
        (tlv(0x20, ssl_value(7, 0, [(0x22, b"a"), (0x22, b"b")])), "duplicate SSL sub-TLV"),
    ],
)
def test_malformed_tlvs_are_invalid(after_addresses: bytes, words: str) -> None:
    result = parse_v2(v2(PROXY, TCP4, ADDR + after_addresses) + b"payload")
    assert isinstance(result, Invalid), result
    assert words in result.reason


def test_the_length_field_bounds_the_tlvs() -> None:
    # The payload after the header must not be read as TLVs: "\x05\x00\x02ok" is payload.
    raw = v2(PROXY, TCP4, ADDR)
    header = parse_v2(raw + tlv(0x05, b"ok"))
    assert isinstance(header, Header)
    assert (header.tlvs, header.length) == ((), len(raw))


# --- the incremental reader ------------------------------------------------------------------


def test_reader_byte_by_byte_then_payload_in_the_same_chunk() -> None:
    reader = HeaderReader()
    for i, byte in enumerate(FULL[:-1]):
        assert isinstance(reader.feed(bytes([byte])), NeedMore)
        assert reader.buffered == i + 1
    result = reader.feed(FULL[-1:] + b"Hello")
    assert isinstance(result, Complete)
    assert (result.header, result.payload) == (parse_v2(FULL), b"Hello")
    assert reader.buffered == len(FULL) + 5
    with pytest.raises(RuntimeError):
        reader.feed(b"more")


def test_reader_header_alone_leaves_an_empty_payload() -> None:
    result = HeaderReader().feed(v2(LOCAL, UNSPEC))
    assert result == Complete(Header("local", "unspec", "unspec", 16), b"")


def test_reader_rejects_early_and_counts_what_it_got() -> None:
    reader = HeaderReader()
    result = reader.feed(b"Hi")
    assert isinstance(result, Invalid)
    assert reader.buffered == 2
    with pytest.raises(RuntimeError):
        reader.feed(b"!")


def test_reader_waits_for_the_declared_length() -> None:
    reader = HeaderReader()
    assert reader.feed(FULL[:16]) == NeedMore(len(FULL))
    assert reader.feed(FULL[16:-1]) == NeedMore(len(FULL))
    assert isinstance(reader.feed(FULL[-1:]), Complete)


# --- properties ------------------------------------------------------------------------------

ASCII = st.text(st.characters(codec="ascii"), max_size=24)
UTF8 = st.text(st.characters(codec="utf-8"), max_size=24)
PORTS = st.integers(0, 65535)


def optional_subs(draw: st.DrawFn) -> tuple[list[tuple[int, bytes]], dict[int, str]]:
    texts: dict[int, str] = {}
    for kind in sorted(KNOWN_SSL_SUBTYPES):
        text = draw(st.none() | (UTF8 if kind == 0x22 else ASCII))
        if text is not None:
            texts[kind] = text
    unknown = draw(
        st.lists(
            st.tuples(
                st.integers(0, 255).filter(lambda k: k not in KNOWN_SSL_SUBTYPES),
                st.binary(max_size=16),
            ),
            max_size=3,
        )
    )
    subs = [(k, t.encode()) for k, t in texts.items()] + unknown
    return draw(st.permutations(subs)), texts


@st.composite
def ssl_infos(draw: st.DrawFn) -> tuple[bytes, SslInfo]:
    client = draw(st.integers(0, 255))
    verify = draw(st.just(0) | st.integers(0, 2**32 - 1))
    subs, texts = optional_subs(draw)
    info = SslInfo(
        client=client,
        verify=verify,
        version=texts.get(0x21),
        cn=texts.get(0x22),
        cipher=texts.get(0x23),
        sig_alg=texts.get(0x24),
        key_alg=texts.get(0x25),
        tlvs=tuple(subs),
    )
    return ssl_value(client, verify, subs), info


@st.composite
def headers(draw: st.DrawFn) -> tuple[bytes, Header]:
    """A random valid header and the Header it must decode to."""
    command: Command = draw(st.sampled_from(["local", "proxy"]))
    family_byte = draw(st.sampled_from(sorted(FAMILIES)))
    family, transport = FAMILIES[family_byte]
    command_bits = LOCAL if command == "local" else PROXY
    if command == "local":
        raw = v2(command_bits, family_byte, draw(st.binary(max_size=64)))
        return raw, Header(command, family, transport, len(raw))

    source = destination = None
    source_path = destination_path = None
    if family == "unspec":
        addresses = b""  # no address block; the TLVs follow the fixed bytes
    elif family == "unix":
        paths = st.binary(max_size=107).map(lambda b: b.replace(b"\0", b"/"))
        source_path, destination_path = draw(paths), draw(paths)
        addresses = unix(source_path, destination_path)
    else:
        ips = st.ip_addresses(v=4) if family == "inet" else st.ip_addresses(v=6)
        src, dst = draw(ips), draw(ips)
        sport, dport = draw(PORTS), draw(PORTS)
        addresses = inet(str(src), sport, str(dst), dport)
        source, destination = (str(src), sport), (str(dst), dport)

    tlvs: list[tuple[int, bytes]] = []
    unique_id = draw(st.none() | st.text(st.characters(codec="ascii"), max_size=128))
    if unique_id is not None:
        tlvs.append((0x05, unique_id.encode()))
    ssl = draw(st.none() | ssl_infos())
    if ssl is not None:
        tlvs.append((0x20, ssl[0]))
    custom = draw(st.none() | UTF8)
    if custom is not None:
        tlvs.append((0xE0, custom.encode()))
    unknown_type = st.integers(0, 255).filter(lambda k: k not in KNOWN_TYPES)
    tlvs += draw(st.lists(st.tuples(unknown_type, st.binary(max_size=32)), max_size=4))
    tlvs = draw(st.permutations(tlvs))

    info = ssl[1] if ssl is not None else None
    identity: str | None
    if custom is not None:
        identity = custom
    elif info is not None and info.verify == 0:
        identity = info.cn
    else:
        identity = None
    raw = v2(command_bits, family_byte, addresses + b"".join(tlv(k, v) for k, v in tlvs))
    return raw, Header(
        command=command,
        family=family,
        transport=transport,
        length=len(raw),
        source=source,
        destination=destination,
        source_path=source_path,
        destination_path=destination_path,
        tlvs=tuple(tlvs),
        ssl=info,
        unique_id=unique_id,
        identity=identity,
    )


@settings(max_examples=300, deadline=None)
@given(headers(), st.binary(max_size=64))
def test_random_valid_headers_parse_back_equal(case: tuple[bytes, Header], payload: bytes) -> None:
    raw, expected = case
    assert parse_v2(raw) == expected
    assert parse_v2(raw + payload) == expected
    for size in range(len(raw)):
        result = parse_v2(raw[:size])
        assert isinstance(result, NeedMore)
        assert size < result.needed <= len(raw)


@settings(max_examples=300, deadline=None)
@given(headers(), st.binary(max_size=64), st.data())
def test_any_split_yields_the_same_header_and_payload(
    case: tuple[bytes, Header], payload: bytes, data: st.DataObject
) -> None:
    raw, expected = case
    stream = raw + payload
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    chunks = [c for c in chunks if c]  # a socket never delivers an empty chunk

    reader = HeaderReader()
    received = bytearray()
    after = bytearray()
    complete: Complete | None = None
    for chunk in chunks:
        if complete is not None:
            after += chunk
            continue
        received += chunk
        result = reader.feed(chunk)
        if len(received) < len(raw):
            assert isinstance(result, NeedMore)
        else:
            assert isinstance(result, Complete)
            complete = result
    assert complete is not None
    assert complete.header == expected
    assert complete.payload + after == payload


# What the spec (proxy-protocol.txt 2.2) says each family/transport byte is, and the size
# of its address block.
SPEC_FAMILIES: dict[int, tuple[Family, Transport]] = {
    UNSPEC: ("unspec", "unspec"),
    TCP4: ("inet", "stream"),
    UDP4: ("inet", "dgram"),
    TCP6: ("inet6", "stream"),
    UDP6: ("inet6", "dgram"),
    UNIX_STREAM: ("unix", "stream"),
    UNIX_DGRAM: ("unix", "dgram"),
}
SPEC_ADDRESS_BLOCK: dict[Family, int] = {"unspec": 0, "inet": 12, "inet6": 36, "unix": 216}


def spec_split(data: bytes) -> list[tuple[int, bytes]] | None:
    """TLVs back to back (type, 16-bit length, value) to the end, or None if they are not."""
    found = []
    while data:
        if len(data) < 3 or len(data) < 3 + int.from_bytes(data[1:3], "big"):
            return None
        size = int.from_bytes(data[1:3], "big")
        found.append((data[0], data[3 : 3 + size]))
        data = data[3 + size :]
    return found


def spec_header(data: bytes) -> NeedMore | Invalid | Header | None:
    """What the spec decides for ``data``: ``Invalid("")`` (any reason) when it cannot be
    a v2 header, ``NeedMore`` with the fewest bytes that can change that answer, the
    whole Header otherwise, or None when an SSL TLV is in it (its value decides: a
    Header with the spec's addresses and TLVs, or Invalid)."""
    if not SIG.startswith(data[:12]):
        return Invalid("")
    if len(data) < 13:
        return NeedMore(len(data) + 1)  # the next byte may break the signature
    version, command = data[12] >> 4, data[12] & 0x0F
    if version != 2 or command not in (LOCAL, PROXY):
        return Invalid("")
    if len(data) < 14:
        return NeedMore(14)
    if data[13] not in SPEC_FAMILIES:
        return Invalid("")
    if len(data) < 16:
        return NeedMore(16)
    total = 16 + int.from_bytes(data[14:16], "big")
    if len(data) < total:
        return NeedMore(total)
    family, transport = SPEC_FAMILIES[data[13]]
    name: Command = "local" if command == LOCAL else "proxy"
    if command == LOCAL:  # not a client's connection: everything after is ignored
        return Header(name, family, transport, total)
    body, need = data[16:total], SPEC_ADDRESS_BLOCK[family]
    tlvs = spec_split(body[need:]) if len(body) >= need else None
    if tlvs is None:
        return Invalid("")
    source = destination = None
    source_path = destination_path = None
    if family == "unix":
        source_path, destination_path = (body[i : i + 108].split(b"\0", 1)[0] for i in (0, 108))
    elif family != "unspec":
        width = 4 if family == "inet" else 16
        ips = [str(ipaddress.ip_address(body[i : i + width])) for i in (0, width)]
        ports = [int.from_bytes(body[2 * width + i : 2 * width + i + 2], "big") for i in (0, 2)]
        source, destination = (ips[0], ports[0]), (ips[1], ports[1])
    known = [(kind, value) for kind, value in tlvs if kind in KNOWN_TYPES]
    values = dict(known)
    if len(values) < len(known):  # a known TLV twice: which one holds is ambiguous
        return Invalid("")
    identity = values.get(0xE0)
    if identity is not None:
        try:
            identity.decode("utf-8")
        except UnicodeDecodeError:
            return Invalid("")
    if 0x20 in values:  # the SSL TLV's own layout decides (see the tests above)
        return None
    unique_id = values.get(0x05)
    return Header(
        name,
        family,
        transport,
        total,
        tlvs=tuple(tlvs),
        unique_id=None if unique_id is None else unique_id.decode("ascii", "backslashreplace"),
        identity=None if identity is None else identity.decode("utf-8"),
        source=source,
        destination=destination,
        source_path=source_path,
        destination_path=destination_path,
    )


@st.composite
def v2_inputs(draw: st.DrawFn) -> bytes:
    """Arbitrary bytes; the signature then arbitrary bytes; and (half the time) a fixed
    part that is mostly valid, an address block of about its family's size, TLVs that
    mostly split (known types among them), cut anywhere."""
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.binary(max_size=80))
    if kind == 1:
        return SIG + draw(st.binary(max_size=80))
    command = draw(st.sampled_from([LOCAL, PROXY, PROXY, PROXY]) | st.integers(0, 15))
    version = 2 if draw(st.integers(0, 9)) else draw(st.integers(0, 15))
    # A valid family byte, a near miss (another low or high nibble), or any byte.
    family = draw(
        st.sampled_from(sorted(SPEC_FAMILIES)) | st.integers(0, 0x4F) | st.integers(0, 255)
    )
    block = SPEC_ADDRESS_BLOCK.get(SPEC_FAMILIES.get(family, ("unspec",))[0], 0)
    address = draw(st.binary(min_size=block, max_size=block) | st.binary(max_size=block + 2))
    values = st.binary(max_size=12) | st.sampled_from([v for _, v in FULL_TLVS])
    kinds = st.sampled_from(sorted(KNOWN_TYPES)) | st.integers(0, 255)
    tlvs = b"".join(tlv(k, v) for k, v in draw(st.lists(st.tuples(kinds, values), max_size=3)))
    body = address + tlvs + (draw(st.binary(max_size=3)) if not draw(st.integers(0, 4)) else b"")
    data = v2(command, family, body, version=version) + draw(st.binary(max_size=4))
    if not draw(st.integers(0, 3)):
        data = data[: draw(st.integers(0, len(data)))]
    return data


def test_every_version_command_and_family_byte_is_decided_as_the_spec_says() -> None:
    """Exhaustively, each value of byte 12 (version, command) and byte 13 (family,
    transport) in an otherwise valid LOCAL header: the spec's answer, exactly."""
    for byte in range(256):
        for data in (
            SIG + bytes([byte, UNSPEC]) + b"\x00\x00",
            SIG + bytes([0x20 | LOCAL, byte]) + b"\x00\x00",
        ):
            expected, got = spec_header(data), parse_v2(data)
            if isinstance(expected, Invalid):  # any reason will do
                assert isinstance(got, Invalid), (data.hex(), got)
            else:
                assert got == expected, data.hex()


@settings(max_examples=1000, deadline=None)
@given(v2_inputs())
def test_arbitrary_bytes_give_the_value_the_spec_decides(data: bytes) -> None:
    result = parse_v2(data)
    expected = spec_header(data)
    if isinstance(expected, Invalid):
        assert isinstance(result, Invalid), result
    elif expected is not None:
        assert result == expected
    elif isinstance(result, Header):  # the SSL TLV was well formed: the rest is the spec's
        total = 16 + int.from_bytes(data[14:16], "big")
        tlvs = spec_split(data[16 + SPEC_ADDRESS_BLOCK[result.family] : total])
        assert (result.command, result.length, result.tlvs) == ("proxy", total, tuple(tlvs or ()))
        assert result.ssl is not None
    else:
        assert isinstance(result, Invalid), result  # never NeedMore: the header is all there
