"""Unit tests for l4proxy.identity with real certificates made by certgen."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization

import certgen
from certgen import Issued
from l4proxy.config import IDENTITY_SOURCES, IdentitySource
from l4proxy.identity import Identity, IdentityCache, NoIdentity, identity_from_der


@pytest.fixture(scope="module")
def ca() -> Issued:
    return certgen.make_ca()


def der(issued: Issued) -> bytes:
    return issued.cert.public_bytes(serialization.Encoding.DER)


# ---------------------------------------------------------------------- identity sources


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("cn", "alpha-cn"),
        ("san_uri", "spiffe://layer4lab/svc/alpha"),
        ("san_dns", "alpha.internal"),
    ],
)
def test_each_source_reads_its_own_field(ca: Issued, source: IdentitySource, expected: str) -> None:
    cert = certgen.make_client(
        ca,
        "alpha",
        common_name="alpha-cn",
        uri="spiffe://layer4lab/svc/alpha",
        dns=["alpha.internal"],
    )
    assert identity_from_der(der(cert), source) == Identity(expected)


def test_default_client_certificate(ca: Issued) -> None:
    data = der(certgen.make_client(ca, "client.a"))
    assert identity_from_der(data, "cn") == Identity("client.a")
    assert identity_from_der(data, "san_uri") == Identity("spiffe://layer4lab/client.a")
    assert identity_from_der(data, "san_dns") == Identity("client.a")


def test_a_cn_with_a_dash_works(ca: Issued) -> None:
    data = der(certgen.make_client(ca, "client-x"))
    assert identity_from_der(data, "cn") == Identity("client-x")
    assert identity_from_der(data, "san_uri") == Identity("spiffe://layer4lab/client-x")


# ------------------------------------------------------------------------------ the EKU


@pytest.mark.parametrize("source", IDENTITY_SOURCES)
def test_server_certificate_is_not_a_client(ca: Issued, source: IdentitySource) -> None:
    data = der(certgen.make_server(ca))
    assert identity_from_der(data, source) == NoIdentity("client_auth_eku_missing")


@pytest.mark.parametrize("source", IDENTITY_SOURCES)
def test_client_shaped_certificate_with_server_eku_only(ca: Issued, source: IdentitySource) -> None:
    data = der(certgen.make_client(ca, "client.a", eku="server"))
    assert identity_from_der(data, source) == NoIdentity("client_auth_eku_missing")


@pytest.mark.parametrize("source", IDENTITY_SOURCES)
def test_certificate_without_eku_is_not_a_client(ca: Issued, source: IdentitySource) -> None:
    data = der(certgen.make_client(ca, "client.a", eku="none"))
    assert identity_from_der(data, source) == NoIdentity("client_auth_eku_missing")


def test_client_and_server_eku_is_accepted(ca: Issued) -> None:
    data = der(certgen.make_client(ca, "client.b", eku="both"))
    assert identity_from_der(data, "cn") == Identity("client.b")


# ---------------------------------------------------------------------- missing fields


def test_no_cn_with_source_cn(ca: Issued) -> None:
    data = der(certgen.make_client(ca, "client.a", common_name=""))
    assert identity_from_der(data, "cn") == NoIdentity("no_cn")
    # the SANs are still there for the other sources
    assert identity_from_der(data, "san_dns") == Identity("client.a")


def test_missing_uri_san_with_source_san_uri(ca: Issued) -> None:
    data = der(certgen.make_client(ca, "client.a", uri=""))
    assert identity_from_der(data, "san_uri") == NoIdentity("no_san_uri")
    assert identity_from_der(data, "san_dns") == Identity("client.a")


def test_no_san_extension_at_all(ca: Issued) -> None:
    data = der(certgen.make_client(ca, "client.a", uri="", dns=()))
    assert identity_from_der(data, "san_uri") == NoIdentity("no_san_uri")
    assert identity_from_der(data, "san_dns") == NoIdentity("no_san_dns")
    assert identity_from_der(data, "cn") == Identity("client.a")


def test_missing_dns_san_with_source_san_dns(ca: Issued) -> None:
    data = der(certgen.make_client(ca, "client.a", dns=()))
    assert identity_from_der(data, "san_dns") == NoIdentity("no_san_dns")


def test_two_dns_sans_are_ambiguous(ca: Issued) -> None:
    data = der(certgen.make_client(ca, "client.a", dns=["a.example", "b.example"]))
    assert identity_from_der(data, "san_dns") == NoIdentity("ambiguous_san_dns")
    assert identity_from_der(data, "cn") == Identity("client.a")


@pytest.mark.parametrize(
    "garbage",
    [b"", b"not a certificate", b"\x30\x82\xff\xff" + b"\x00" * 16, bytes(range(256))],
)
def test_garbage_bytes_are_unparsable(garbage: bytes) -> None:
    for source in IDENTITY_SOURCES:
        assert identity_from_der(garbage, source) == NoIdentity("unparsable_certificate")


def test_truncated_and_pem_input_is_unparsable(ca: Issued) -> None:
    issued = certgen.make_client(ca, "client.a")
    assert identity_from_der(der(issued)[:-10], "cn") == NoIdentity("unparsable_certificate")
    pem = issued.cert.public_bytes(serialization.Encoding.PEM)
    assert identity_from_der(pem, "cn") == NoIdentity("unparsable_certificate")


# ----------------------------------------------------------------------------- the cache


def test_cache_returns_equal_results(ca: Issued) -> None:
    good = der(certgen.make_client(ca, "client.a"))
    bad = der(certgen.make_server(ca))
    cache = IdentityCache("san_uri")
    assert cache.lookup(good) == Identity("spiffe://layer4lab/client.a")
    assert cache.lookup(good) == identity_from_der(good, "san_uri")
    assert cache.lookup(bad) == NoIdentity("client_auth_eku_missing")
    assert cache.lookup(bad) == identity_from_der(bad, "san_uri")
    assert cache.lookup(b"junk") == NoIdentity("unparsable_certificate")


def test_cache_stays_bounded(ca: Issued) -> None:
    certs = [der(certgen.make_client(ca, f"client.{c}")) for c in "abcde"]
    cache = IdentityCache("cn", limit=2)
    for round_ in range(2):
        for name, data in zip("abcde", certs, strict=True):
            assert cache.lookup(data) == Identity(f"client.{name}"), round_
            assert len(cache._entries) <= 2
    assert len(cache._entries) >= 1
