"""Unit tests for l4proxy.identity with real certificates made by certgen."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

import certgen
from certgen import Issued
from l4proxy.config import IDENTITY_CHARSETS, IDENTITY_SOURCES, IdentityCharset, IdentitySource
from l4proxy.identity import (
    Identity,
    IdentityCache,
    NoIdentity,
    Refusal,
    identity_from_der,
    normalize_identity,
)


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


# ------------------------------------------------------------------------ normalization

NORMALIZED = [
    # (text, ascii result, unicode result); a result is the identity or the refusal reason
    ("client.a", "client.a", "client.a"),
    ("Client.A", "client.a", "client.a"),
    ("CLIENT.A", "client.a", "client.a"),
    ("spiffe://layer4lab/Svc/A", "spiffe://layer4lab/svc/a", "spiffe://layer4lab/svc/a"),
    ("client-x_1:8443/~!", "client-x_1:8443/~!", "client-x_1:8443/~!"),
    ("client.a ", "identity_has_whitespace: U+0020 at 8", "identity_has_whitespace: U+0020 at 8"),
    (" client.a", "identity_has_whitespace: U+0020 at 0", "identity_has_whitespace: U+0020 at 0"),
    ("client a", "identity_has_whitespace: U+0020 at 6", "identity_has_whitespace: U+0020 at 6"),
    ("client\ta", "identity_has_whitespace: U+0009 at 6", "identity_has_whitespace: U+0009 at 6"),
    ("client.a\n", "identity_has_whitespace: U+000A at 8", "identity_has_whitespace: U+000A at 8"),
    (
        "client\u00a0a",
        "identity_has_whitespace: U+00A0 at 6",
        "identity_has_whitespace: U+00A0 at 6",
    ),
    (
        "client\u3000a",
        "identity_has_whitespace: U+3000 at 6",
        "identity_has_whitespace: U+3000 at 6",
    ),
    ("client\x00a", "identity_has_control: U+0000 at 6", "identity_has_control: U+0000 at 6"),
    ("client.a\x7f", "identity_has_control: U+007F at 8", "identity_has_control: U+007F at 8"),
    ("\x1b[31mred", "identity_has_control: U+001B at 0", "identity_has_control: U+001B at 0"),
    ("client\x9ba", "identity_has_control: U+009B at 6", "identity_has_control: U+009B at 6"),
    ("client\u200ba", "identity_has_control: U+200B at 6", "identity_has_control: U+200B at 6"),
    ("client\u202ea", "identity_has_control: U+202E at 6", "identity_has_control: U+202E at 6"),
    ("\ufeffclient.a", "identity_has_control: U+FEFF at 0", "identity_has_control: U+FEFF at 0"),
    ("\u0441lient.a", "identity_not_ascii: U+0441 at 0", "\u0441lient.a"),  # Cyrillic es
    ("\u0421lient.a", "identity_not_ascii: U+0421 at 0", "\u0441lient.a"),
    ("\uff43\uff4c\uff49", "identity_not_ascii: U+FF43 at 0", "\uff43\uff4c\uff49"),  # fullwidth
    ("caf\u00e9", "identity_not_ascii: U+00E9 at 3", "caf\u00e9"),
    ("cafe\u0301", "identity_not_ascii: U+0301 at 4", "caf\u00e9"),  # NFC: e + acute is é
    ("CAF\u00c9", "identity_not_ascii: U+00C9 at 3", "caf\u00e9"),
    ("Stra\u00dfe", "identity_not_ascii: U+00DF at 4", "strasse"),
    ("\u03a3\u0399\u03a3", "identity_not_ascii: U+03A3 at 0", "\u03c3\u03b9\u03c3"),
    ("x\U000e0001", "identity_has_control: U+E0001 at 1", "identity_has_control: U+E0001 at 1"),
    ("x\ue000", "identity_not_ascii: U+E000 at 1", "identity_has_unassigned: U+E000 at 1"),
    ("x\U0010fffe", "identity_not_ascii: U+10FFFE at 1", "identity_has_unassigned: U+10FFFE at 1"),
    ("x\ud800", "identity_not_ascii: U+D800 at 1", "identity_has_unassigned: U+D800 at 1"),
    ("", "identity_empty", "identity_empty"),
]


def outcome(text: str, charset: IdentityCharset) -> str:
    result = normalize_identity(text, charset)
    return result.reason if isinstance(result, Refusal) else result


@pytest.mark.parametrize(
    ("text", "in_ascii", "in_unicode"), NORMALIZED, ids=[ascii(t) for t, _, _ in NORMALIZED]
)
def test_normalize_identity_table(text: str, in_ascii: str, in_unicode: str) -> None:
    assert outcome(text, "ascii") == in_ascii
    assert outcome(text, "unicode") == in_unicode


def test_refusal_reasons_are_short_and_never_echo_the_character() -> None:
    for text, _, _ in NORMALIZED:
        for charset in IDENTITY_CHARSETS:
            result = normalize_identity(text, charset)
            if isinstance(result, Refusal):
                assert result.reason.isascii()
                assert result.reason.isprintable()
                assert len(result.reason) < 48
                assert result.reason.startswith(result.code)


def test_canonically_equivalent_and_case_variants_are_one_identity_in_unicode() -> None:
    spellings = ["caf\u00e9", "cafe\u0301", "CAF\u00c9", "CAFE\u0301", "Caf\u00c9"]
    assert {normalize_identity(s, "unicode") for s in spellings} == {"caf\u00e9"}


# Mostly ASCII, with a sprinkling of the characters the rule is about.
TEXTS = st.text(
    st.one_of(
        st.characters(min_codepoint=0x20, max_codepoint=0x7E),
        st.sampled_from(["\t", "\x00", "\x7f", "\u0441", "\u00e9", "\u0301", "\u00df", "\u0130"]),
        st.characters(),
    ),
    max_size=24,
)


@settings(max_examples=400, deadline=None)
@given(text=TEXTS, charset=st.sampled_from(IDENTITY_CHARSETS))
def test_normalization_is_idempotent(text: str, charset: IdentityCharset) -> None:
    once = normalize_identity(text, charset)
    if isinstance(once, Refusal):
        return
    assert normalize_identity(once, charset) == once
    # An identity under ascii is one under unicode too, with the same form.
    if charset == "ascii":
        assert normalize_identity(once, "unicode") == once


@settings(max_examples=400, deadline=None)
@given(text=TEXTS)
def test_ascii_identities_are_lowercase_printable_ascii(text: str) -> None:
    result = normalize_identity(text, "ascii")
    printable = bool(text) and all(0x21 <= ord(c) <= 0x7E for c in text)
    assert isinstance(result, str) == printable  # refused exactly when not printable ASCII
    if isinstance(result, Refusal):
        return
    assert result.isascii()
    assert result == result.lower()
    assert result
    assert all(0x21 <= ord(c) <= 0x7E for c in result)
    assert not any(c.isspace() for c in result)


@settings(max_examples=400, deadline=None)
@given(text=TEXTS, flips=st.lists(st.booleans(), min_size=24, max_size=24))
def test_spellings_differing_only_in_ascii_case_are_one_identity(
    text: str, flips: list[bool]
) -> None:
    other = "".join(
        c.swapcase() if flip and c.isascii() else c for c, flip in zip(text, flips, strict=False)
    )
    for charset in IDENTITY_CHARSETS:
        assert normalize_identity(text, charset) == normalize_identity(other, charset)


# ------------------------------------------------------------- normalization at the door


def test_certificate_identity_is_normalized(ca: Issued) -> None:
    data = der(certgen.make_client(ca, "Client.A"))
    for charset in IDENTITY_CHARSETS:
        assert identity_from_der(data, "cn", charset) == Identity("client.a")
        assert identity_from_der(data, "san_dns", charset) == Identity("client.a")
        assert identity_from_der(data, "san_uri", charset) == Identity(
            "spiffe://layer4lab/client.a"
        )
    assert IdentityCache("cn").lookup(data) == Identity("client.a")


@pytest.mark.parametrize(
    ("common_name", "in_ascii", "in_unicode"),
    [
        ("client.a ", "identity_has_whitespace: U+0020 at 8", None),
        ("\u0441lient.a", "identity_not_ascii: U+0441 at 0", "\u0441lient.a"),
        ("client\x00a", "identity_has_control: U+0000 at 6", None),
        ("CAFE\u0301", "identity_not_ascii: U+0301 at 4", "caf\u00e9"),
    ],
)
def test_certificate_identity_is_refused_per_charset(
    ca: Issued,
    common_name: str,
    in_ascii: str,
    in_unicode: str | None,
) -> None:
    # DNS and URI SANs must be ASCII (cryptography enforces it), so the CN carries these.
    data = der(certgen.make_client(ca, "x", common_name=common_name, uri="", dns=()))
    assert identity_from_der(data, "cn") == NoIdentity(in_ascii)
    assert IdentityCache("cn", charset="ascii").lookup(data) == NoIdentity(in_ascii)
    expected = NoIdentity(in_ascii) if in_unicode is None else Identity(in_unicode)
    assert identity_from_der(data, "cn", "unicode") == expected
    assert IdentityCache("cn", charset="unicode").lookup(data) == expected
