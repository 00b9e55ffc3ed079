"""The admin listener's HTTP edge: the strict parser and the POST /reload CSRF rule."""

from __future__ import annotations

import re
import string
from types import SimpleNamespace
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from l4proxy import adminctl
from l4proxy.admin import (
    ADMIN_HEADER,
    BODY_LIMIT,
    AdminServer,
    Request,
    Response,
    parse_request,
)
from l4proxy.server import Proxy

# --- the strict parser: table ---------------------------------------------------------------


def head(*lines: str | bytes) -> bytes:
    return b"".join((x.encode() if isinstance(x, str) else x) + b"\r\n" for x in lines) + b"\r\n"


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        # Content-Length: ASCII digits only, one value.
        (head("POST /reload HTTP/1.1", "Content-Length: \u00b2".encode()), "superscript two"),
        (head("POST /reload HTTP/1.1", b"Content-Length: \xb2"), "superscript two, latin-1"),
        (head("POST /reload HTTP/1.1", "Content-Length: \u0663".encode()), "Arabic-Indic 3"),
        (head("POST /reload HTTP/1.1", "Content-Length: 1 2"), "two numbers"),
        (head("POST /reload HTTP/1.1", "Content-Length: +5"), "a sign"),
        (head("POST /reload HTTP/1.1", "Content-Length: -1"), "negative"),
        (head("POST /reload HTTP/1.1", "Content-Length: 1_0"), "an underscore"),
        (head("POST /reload HTTP/1.1", "Content-Length: 0x10"), "hex"),
        (head("POST /reload HTTP/1.1", "Content-Length: 5, 5"), "a list"),
        (head("POST /reload HTTP/1.1", "Content-Length:"), "empty"),
        (head("POST /reload HTTP/1.1", "Content-Length: \x0b5"), "vertical tab"),
        (head("POST /reload HTTP/1.1", "Content-Length: 5\x0c"), "form feed"),
        (head("POST /reload HTTP/1.1", "Content-Length: 1", "Content-Length: 2"), "differ"),
        (head("POST /reload HTTP/1.1", "Content-Length: 5", "Content-Length: 05"), "spelling"),
        (head("POST /reload HTTP/1.1", "Content-Length : 5"), "space before colon"),
        (head("POST /reload HTTP/1.1", "Transfer-Encoding: chunked"), "chunked"),
        # Header names and values.
        (head("GET / HTTP/1.1", "H\u00f6st: a".encode()), "non-ASCII name"),
        (head("GET / HTTP/1.1", "Host: caf\u00e9".encode()), "non-ASCII value (UTF-8)"),
        (head("GET / HTTP/1.1", b"Host: caf\xe9"), "non-ASCII value (latin-1)"),
        (head("GET / HTTP/1.1", "Host: a\x00b"), "NUL in a value"),
        (head("GET / HTTP/1.1", "Host: a\x7fb"), "DEL in a value"),
        (head("GET / HTTP/1.1", "Host: a\rb"), "bare CR in a value"),
        (head("GET / HTTP/1.1", "Host: a\nb"), "bare LF in a value"),
        (head("GET / HTTP/1.1", "Host: a", " folded"), "obs-fold, space"),
        (head("GET / HTTP/1.1", "Host: a", "\tfolded"), "obs-fold, tab"),
        (head("GET / HTTP/1.1", " Host: a"), "leading space"),
        (head("GET / HTTP/1.1", "Ho st: a"), "space in a name"),
        (head("GET / HTTP/1.1", "Host(x): a"), "non-tchar in a name"),
        (head("GET / HTTP/1.1", ": a"), "empty name"),
        (head("GET / HTTP/1.1", "no colon"), "no colon"),
        (head("GET / HTTP/1.1", "", "Host: a"), "a blank line inside the head"),
        # The request line.
        (head("get / HTTP/1.1"), "lowercase method"),
        (head("G3T / HTTP/1.1"), "digit in method"),
        (head("GET  / HTTP/1.1"), "two spaces"),
        (head("GET / HTTP/1.1 "), "trailing space"),
        (head("GET /"), "no version"),
        (head("GET / HTTP/2"), "HTTP/2"),
        (head("GET / HTTP/1.2"), "HTTP/1.2"),
        (head("GET / http/1.1"), "lowercase version"),
        (head("GET * HTTP/1.1"), "asterisk-form"),
        (head("GET http://a/ HTTP/1.1"), "absolute-form"),
        (head("GET /a\x01b HTTP/1.1"), "control in the target"),
        (head("GET /caf\u00e9 HTTP/1.1".encode()), "non-ASCII target"),
        (head("\u0047ET\u00a0/ HTTP/1.1".encode()), "no-break space"),
        (head(""), "empty"),
        (b"", "nothing at all"),
    ],
)
def test_malformed_heads_get_400(raw: bytes, why: str) -> None:
    got = parse_request(raw)
    assert isinstance(got, Response), why
    assert got.status == 400, why


@pytest.mark.parametrize(
    "raw",
    [
        head("POST /reload HTTP/1.1", f"Content-Length: {BODY_LIMIT + 1}"),
        head("POST /reload HTTP/1.1", "Content-Length: " + "9" * 5000),  # beyond int() limit
    ],
)
def test_too_large_bodies_get_413(raw: bytes) -> None:
    got = parse_request(raw)
    assert isinstance(got, Response)
    assert got.status == 413


@pytest.mark.parametrize(
    ("raw", "length"),
    [
        (head("POST /reload HTTP/1.1", "Content-Length: 0"), 0),
        (head("POST /reload HTTP/1.0", "Content-Length:7"), 7),
        (head("POST /reload HTTP/1.1", "Content-Length: \t 7 \t"), 7),  # OWS is trimmed
        (head("POST /reload HTTP/1.1", "Content-Length: 007"), 7),
        (head("POST /reload HTTP/1.1", "Content-Length: " + "0" * 5000 + "3"), 3),
        (head("POST /reload HTTP/1.1", "Content-Length: 4", "content-length: 4"), 4),
        (head("POST /reload HTTP/1.1", f"Content-Length: {BODY_LIMIT}"), BODY_LIMIT),
        (head("POST /reload HTTP/1.1"), 0),
    ],
)
def test_good_content_lengths_are_parsed_once_into_an_int(raw: bytes, length: int) -> None:
    got = parse_request(raw)
    assert isinstance(got, Request)
    assert got.content_length == length


def test_a_strict_request_keeps_its_headers() -> None:
    got = parse_request(
        head("GET /status?x=1 HTTP/1.0", "Host: a", "X-Y:\tv w ", "Accept: a", "accept: b")
    )
    assert got == Request("GET", "/status", {"host": "a", "x-y": "v w", "accept": "a, b"})


# --- the strict parser: properties ----------------------------------------------------------

TCHAR = "!#$%&'*+-.^_`|~" + string.digits + string.ascii_letters
VISIBLE = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
FIELD_CHARS = st.characters(min_codepoint=0x20, max_codepoint=0x7E, include_characters="\t")
KNOWN_NAMES = [
    "Content-Length",
    "content-length",
    "Transfer-Encoding",
    "Origin",
    "Sec-Fetch-Site",
    ADMIN_HEADER,
    "Host",
]
# Values a Content-Length parser gets wrong: Unicode digits (isdigit() is True, int()
# takes some, not others), separators int() accepts, whitespace, huge numbers.
TRICKY_LENGTHS = [
    "1_0",
    " 7",
    "7 ",
    "\t7",
    "+5",
    "-1",
    "0x10",
    "1 2",
    "5, 5",
    "1e3",
    "",
    "0" * 50 + "1",
    "9" * 5000,  # int() refuses more than 4300 digits
]
UNICODE_LENGTHS = [
    "\u00b2",  # superscript two: isdigit(), int() raises
    "\u0663",  # Arabic-Indic three: int() says 3
    "\uff15",  # fullwidth five
    "\u2467",  # circled eight
]


@st.composite
def lengths(draw: st.DrawFn) -> str:
    """Content-Length values: numbers, ASCII near-misses, and (1 in 8) Unicode digits."""
    if not draw(st.integers(0, 7)):
        return draw(
            st.sampled_from(UNICODE_LENGTHS)
            | st.text(st.characters(categories=["Nd", "No"]), min_size=1, max_size=4)
        )
    return draw(
        st.integers(0, 2 * BODY_LIMIT).map(str)
        | st.integers(BODY_LIMIT - 2, BODY_LIMIT + 2).map(str)
        | st.sampled_from(TRICKY_LENGTHS)
        | st.from_regex(r"[0-9 _+\-,.\t]{0,8}", fullmatch=True)
    )


LENGTHS = lengths()
CONTENT_LENGTHS = st.sampled_from(["Content-Length", "content-length", "CONTENT-LENGTH"])
NAMES = st.sampled_from(KNOWN_NAMES) | st.text(st.sampled_from(TCHAR), min_size=1, max_size=12)
ANY_ASCII = st.text(st.characters(max_codepoint=0x7F), max_size=12)  # controls, spaces...
ANY_TEXT = st.text(max_size=12)  # ... and non-ASCII
LATIN1 = st.binary(max_size=8).map(lambda b: b.decode("latin-1"))
FIELD_TEXT = st.text(FIELD_CHARS, max_size=20)
FOLDS = st.sampled_from([" ", "\t"])
SEPARATORS = st.sampled_from([":", ":\t", " : ", ":  "])


@st.composite
def header_lines(draw: st.DrawFn) -> str:
    """Mostly well-formed lines (many of them Content-Length, with tricky values), some
    with an arbitrary name or value, a few folded."""
    kind = draw(st.integers(0, 19))
    if kind <= 7:
        name, value = draw(CONTENT_LENGTHS), draw(LENGTHS)
    elif kind <= 13:
        name, value = draw(NAMES), draw(FIELD_TEXT | LENGTHS)
    elif kind <= 15:
        name, value = draw(ANY_ASCII), draw(FIELD_TEXT)
    elif kind <= 17:
        name, value = draw(NAMES), draw(ANY_ASCII)
    elif kind == 18:
        name, value = draw(NAMES), draw(ANY_TEXT | LATIN1)
    else:
        name, value = draw(NAMES | ANY_TEXT), draw(LENGTHS | ANY_TEXT | LATIN1)
    sep = ": " if draw(st.integers(0, 3)) else draw(SEPARATORS)
    fold = "" if draw(st.integers(0, 19)) else draw(FOLDS)
    return f"{fold}{name}{sep}{value}"


@st.composite
def heads(draw: st.DrawFn) -> bytes:
    """A request head that almost always has a valid request line, then headers whose
    names and values mix the grammar with arbitrary text, then (rarely) raw bytes
    spliced in anywhere."""

    def mostly(valid: st.SearchStrategy[str], other: st.SearchStrategy[str]) -> str:
        return draw(valid if draw(st.integers(0, 19)) else other)

    method = mostly(st.sampled_from(["GET", "POST", "HEAD", "PUT"]), st.text(max_size=6))
    target = mostly(
        st.sampled_from(["/", "/reload", "/status", "/ready", "/metrics"])
        | st.text(VISIBLE, max_size=10).map(lambda t: "/" + t),
        st.text(max_size=10),
    )
    version = mostly(st.sampled_from(["HTTP/1.1", "HTTP/1.0"]), st.text(max_size=9))
    lines = [f"{method} {target} {version}", *draw(st.lists(header_lines(), max_size=5))]
    text = "\r\n".join(lines) + "\r\n\r\n"
    raw = text.encode(draw(st.sampled_from(["utf-8", "utf-8", "utf-8", "latin-1"])), "replace")
    if not draw(st.integers(0, 19)):
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.binary(min_size=1, max_size=4)) + raw[at:]
    return raw


FIELD_VALUE = re.compile(r"[\t\x20-\x7e]*")


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(heads())
def test_any_head_parses_to_a_request_or_a_400_or_413_never_an_exception(raw: bytes) -> None:
    got = parse_request(raw)
    if isinstance(got, Response):
        event(f"response {got.status} {got.body.decode().strip()}")
        assert got.status in (400, 413)
        return
    event("request" + (" with a body" if got.content_length else ""))
    assert isinstance(got, Request)
    assert re.fullmatch(r"[A-Z]+", got.method)
    assert got.path.startswith("/")
    assert 0 <= got.content_length <= BODY_LIMIT
    assert got.headers.get("content-length", "0") == str(got.content_length)
    assert "transfer-encoding" not in got.headers
    for name, value in got.headers.items():
        assert name.isascii()
        assert FIELD_VALUE.fullmatch(value)


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from(["GET", "POST", "HEAD"]),
    st.text(VISIBLE, max_size=10),
    st.dictionaries(
        st.text(st.sampled_from(TCHAR), min_size=1, max_size=12).filter(
            lambda n: n.lower() not in ("content-length", "transfer-encoding")
        ),
        st.text(FIELD_CHARS, max_size=20),
        max_size=6,
    ),
    st.integers(0, BODY_LIMIT),
)
def test_a_valid_head_round_trips(
    method: str, path: str, fields: dict[str, str], length: int
) -> None:
    lines = [f"{method} /{path} HTTP/1.1", *(f"{n}: {v}" for n, v in fields.items())]
    lines.append(f"Content-Length: {length}")
    got = parse_request(("\r\n".join(lines) + "\r\n\r\n").encode())
    assert isinstance(got, Request)
    assert (got.method, got.path, got.content_length) == (
        method,
        "/" + path.split("?", 1)[0],
        length,
    )
    expected: dict[str, list[str]] = {}
    for name, value in fields.items():
        expected.setdefault(name.lower(), []).append(value.strip(" \t"))
    for name, values in expected.items():
        assert got.headers[name] == ", ".join(values)


# --- POST /reload is refused to browsers (CSRF) ---------------------------------------------


class FakeProxy:
    def __init__(self) -> None:
        self.reloads = 0
        self.ready = (True, "ready")

    def reload(self) -> Any:
        self.reloads += 1
        return SimpleNamespace(ok=True, message="reloaded", sha256="ab", added=(), removed=())


def serve(raw: bytes) -> tuple[Response, FakeProxy]:
    proxy = FakeProxy()
    admin = AdminServer(cast(Proxy, proxy))
    request = parse_request(raw)
    assert isinstance(request, Request)
    return admin.respond(request), proxy


OURS = f"{ADMIN_HEADER}: 1"


def test_post_reload_with_our_header_reloads() -> None:
    response, proxy = serve(head("POST /reload HTTP/1.1", OURS))
    assert (response.status, proxy.reloads) == (200, 1)
    response, proxy = serve(head("POST /reload HTTP/1.1", "Sec-Fetch-Site: none", OURS))
    assert (response.status, proxy.reloads) == (200, 1)


@pytest.mark.parametrize(
    "extra",
    [
        ["Origin: http://example.invalid"],
        ["Origin: null"],
        ["Origin: http://127.0.0.1:9100"],  # "same origin" as a DNS-rebinding page sees it
        ["Sec-Fetch-Site: cross-site"],
        ["Sec-Fetch-Site: same-site"],
        ["Sec-Fetch-Site: same-origin"],
        ["Origin: http://example.invalid", "Sec-Fetch-Site: none"],
    ],
)
def test_post_reload_from_a_browser_is_refused_with_403(extra: list[str]) -> None:
    response, proxy = serve(head("POST /reload HTTP/1.1", OURS, *extra))
    assert response.status == 403
    assert proxy.reloads == 0
    body = response.body.decode()
    assert body.count("\n") == 1
    assert ADMIN_HEADER in body
    assert "Origin" in body


def test_post_reload_without_our_header_is_refused_with_403() -> None:
    for extra in ([], ["Content-Type: text/plain"], ["X-Other: 1"]):
        response, proxy = serve(head("POST /reload HTTP/1.1", *extra))
        assert (response.status, proxy.reloads) == (403, 0)


def test_get_routes_do_not_need_the_header_and_get_reload_stays_405() -> None:
    response, _ = serve(head("GET /ready HTTP/1.1", "Origin: http://example.invalid"))
    assert response.status == 200
    response, _ = serve(head("HEAD / HTTP/1.1"))
    assert response.status == 200
    response, proxy = serve(head("GET /reload HTTP/1.1"))
    assert (response.status, response.headers, proxy.reloads) == (405, {"Allow": "POST"}, 0)


def test_adminctl_sends_the_header_the_listener_wants() -> None:
    assert ADMIN_HEADER in adminctl.ADMIN_HEADERS
