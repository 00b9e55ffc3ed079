"""PROXY protocol v2 headers, checked byte by byte against the specification's layout
(HAProxy's proxy-protocol.txt, section 2.2), and read back by the lab upstream's parser."""

from __future__ import annotations

import struct
from ipaddress import ip_address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from l4proxy import proxyproto
from l4proxy.proxyproto import ClientFacts
from upstream import proxyproto as reader

# The 12-byte signature, spelled out as the specification prints it.
SIG = bytes([0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A])


def facts(**changes: object) -> ClientFacts:
    base: dict[str, object] = {
        "source": ("192.0.2.10", 51000),
        "destination": ("198.51.100.1", 8443),
        "identity": "client.b",
        "connection_id": "42",
        "tls_version": "TLSv1.3",
        "cipher": "TLS_AES_256_GCM_SHA384",
        "common_name": "client.b",
        "resumed": False,
    }
    base.update(changes)
    return ClientFacts(**base)  # type: ignore[arg-type]


def test_the_signature_is_the_specifications() -> None:
    assert proxyproto.SIGNATURE == SIG


def test_local_header_is_sixteen_bytes_with_no_addresses() -> None:
    # version 2 + LOCAL = 0x20; UNSPEC family and transport = 0x00; length 0
    assert proxyproto.local_header() == SIG + b"\x20\x00\x00\x00"


def test_ipv4_client_header_byte_layout() -> None:
    header = proxyproto.client_header(facts())
    assert header[:12] == SIG
    assert header[12] == 0x21  # version 2, command PROXY
    assert header[13] == 0x11  # AF_INET, STREAM
    (length,) = struct.unpack("!H", header[14:16])
    assert length == len(header) - 16
    body = header[16:]
    assert body[:4] == bytes([192, 0, 2, 10])  # source address
    assert body[4:8] == bytes([198, 51, 100, 1])  # destination address
    assert body[8:10] == (51000).to_bytes(2, "big")  # source port
    assert body[10:12] == (8443).to_bytes(2, "big")  # destination port
    tlvs = body[12:]
    # PP2_TYPE_UNIQUE_ID, length 2, "42"
    assert tlvs[:5] == b"\x05\x00\x0242"
    # PP2_TYPE_SSL: client = SSL | CERT_CONN | CERT_SESS, verify = 0, then sub-TLVs
    ssl_subs = (
        b"\x21\x00\x07TLSv1.3" + b"\x22\x00\x08client.b" + b"\x23\x00\x16TLS_AES_256_GCM_SHA384"
    )
    ssl_value = b"\x07" + b"\x00\x00\x00\x00" + ssl_subs
    ssl_tlv = b"\x20" + len(ssl_value).to_bytes(2, "big") + ssl_value
    assert tlvs[5 : 5 + len(ssl_tlv)] == ssl_tlv
    # the custom identity TLV (0xE0) closes the header
    assert tlvs[5 + len(ssl_tlv) :] == b"\xe0\x00\x08client.b"


def test_ipv6_client_header_byte_layout() -> None:
    header = proxyproto.client_header(
        facts(source=("2001:db8::7", 40000), destination=("2001:db8::1", 443))
    )
    assert header[12:14] == b"\x21\x21"  # PROXY; AF_INET6, STREAM
    body = header[16:]
    assert body[:16] == bytes.fromhex("20010db8000000000000000000000007")
    assert body[16:32] == bytes.fromhex("20010db8000000000000000000000001")
    assert body[32:36] == struct.pack("!HH", 40000, 443)


def test_mixed_families_use_ipv4_mapped_ipv6() -> None:
    header = proxyproto.client_header(facts(source=("192.0.2.10", 1), destination=("::1", 2)))
    assert header[13] == 0x21
    assert header[16:32] == bytes.fromhex("00000000000000000000ffffc000020a")


def test_an_ipv6_zone_id_is_dropped() -> None:
    header = proxyproto.client_header(
        facts(source=("fe80::1%eth0", 1), destination=("fe80::2%eth0", 2))
    )
    assert header[16:32] == bytes.fromhex("fe800000000000000000000000000001")


@pytest.mark.parametrize(
    ("source", "destination"),
    [(None, ("127.0.0.1", 1)), (("unix-socket", 0), ("127.0.0.1", 1))],
)
def test_unknown_addresses_send_unspec_with_tlvs_still(
    source: tuple[str, int] | None, destination: tuple[str, int]
) -> None:
    header = proxyproto.client_header(facts(source=source, destination=destination))
    assert header[12:14] == b"\x21\x00"
    assert header[16] == proxyproto.PP2_TYPE_UNIQUE_ID  # TLVs right after the fixed part


def test_resumed_session_flags_and_absent_cn() -> None:
    value = proxyproto.ssl_tlv_value(facts(resumed=True, common_name=None))
    assert value[0] == proxyproto.PP2_CLIENT_SSL | proxyproto.PP2_CLIENT_CERT_SESS
    assert value[1:5] == b"\x00\x00\x00\x00"
    kinds, rest = [], value[5:]
    while rest:
        kind, length = struct.unpack("!BH", rest[:3])
        kinds.append(kind)
        rest = rest[3 + length :]
    assert kinds == [proxyproto.PP2_SUBTYPE_SSL_VERSION, proxyproto.PP2_SUBTYPE_SSL_CIPHER]


def test_a_header_that_cannot_fit_is_an_error_not_a_truncation() -> None:
    with pytest.raises(ValueError, match=r"too long|exceeds"):
        proxyproto.client_header(facts(identity="x" * 70000))


def test_unique_id_is_capped_at_the_specifications_128_bytes() -> None:
    header = proxyproto.client_header(facts(connection_id="9" * 300))
    parsed = reader.parse_v2(header)
    assert isinstance(parsed, reader.Header)
    assert parsed.unique_id == "9" * 128


# --- read back by the lab upstream's parser (an independent implementation) ----------------


def same_endpoint(got: tuple[str, int] | None, want: tuple[str, int]) -> bool:
    """Equal addresses, whatever their spelling (``::ffff:0:0`` is ``::ffff:0.0.0.0``)."""
    return got is not None and (ip_address(got[0]), got[1]) == (ip_address(want[0]), want[1])


hosts_v4 = st.ip_addresses(v=4).map(str)
hosts_v6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)
names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=80)


@given(
    family=st.sampled_from(["v4", "v6"]),
    data=st.data(),
    identity=names,
    conn=st.integers(1, 10**12),
    resumed=st.booleans(),
)
def test_the_upstream_parser_reads_back_what_the_proxy_writes(
    family: str, data: st.DataObject, identity: str, conn: int, resumed: bool
) -> None:
    hosts = hosts_v4 if family == "v4" else hosts_v6
    source = (data.draw(hosts), data.draw(ports))
    destination = (data.draw(hosts), data.draw(ports))
    header = proxyproto.client_header(
        facts(
            source=source,
            destination=destination,
            identity=identity,
            connection_id=str(conn),
            resumed=resumed,
        )
    )
    payload = b"Hello from client\n"
    parsed = reader.parse_v2(header + payload)
    assert isinstance(parsed, reader.Header), parsed
    assert parsed.command == "proxy"
    assert parsed.length == len(header)
    assert same_endpoint(parsed.source, source)
    assert same_endpoint(parsed.destination, destination)
    assert parsed.identity == identity
    assert parsed.unique_id == str(conn)
    assert parsed.ssl is not None
    assert parsed.ssl.verify == 0
    assert parsed.ssl.version == "TLSv1.3"
    # every strict prefix is incomplete, never invalid
    for cut in range(len(header)):
        assert isinstance(reader.parse_v2(header[:cut]), reader.NeedMore), cut


def test_the_upstream_parser_reads_the_local_header() -> None:
    parsed = reader.parse_v2(proxyproto.local_header())
    assert isinstance(parsed, reader.Header)
    assert parsed.command == "local"
    assert parsed.source is None
