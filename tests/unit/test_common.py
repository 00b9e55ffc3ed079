"""l4common, the services' shared package: durations, addresses, the error type and the
JSON log line. The services import these (re-exported under their old names), so a
behaviour pinned here is every service's."""

from __future__ import annotations

import io
import ipaddress
import json
import math
import pickle
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import client.config
import l4proxy.config
import l4proxy.logs
import upstream.config
from l4common.addresses import Address, format_address, parse_address
from l4common.durations import parse_duration
from l4common.errors import ConfigError
from l4common.logs import JsonLog, to_json, utc_timestamp

T = TypeVar("T")


def outcome(parse: Callable[[], T]) -> T | ConfigError:
    """What a parser returned, or the :class:`ConfigError` it raised."""
    try:
        return parse()
    except ConfigError as exc:
        return exc


# ------------------------------------------------------------------------------ errors


def test_config_error_carries_key_and_problem() -> None:
    error = ConfigError("timeouts.idle", "must be greater than zero")
    assert (error.key, error.problem) == ("timeouts.idle", "must be greater than zero")
    assert str(error) == "timeouts.idle: must be greater than zero"
    assert isinstance(error, ValueError)
    assert str(ConfigError("", "the file is not YAML")) == "the file is not YAML"


def test_config_error_survives_pickling() -> None:
    error = pickle.loads(pickle.dumps(ConfigError("--delay/UPSTREAM_DELAY", "bad")))
    assert (error.key, error.problem, str(error)) == (
        "--delay/UPSTREAM_DELAY",
        "bad",
        "--delay/UPSTREAM_DELAY: bad",
    )


def test_the_services_share_one_error_and_one_set_of_parsers() -> None:
    for module in (l4proxy.config, upstream.config, client.config):
        assert module.ConfigError is ConfigError
        assert module.parse_duration is parse_duration
        assert module.parse_address is parse_address
    assert l4proxy.config.Address is Address
    assert (l4proxy.logs.JsonLog, l4proxy.logs.utc_timestamp) == (JsonLog, utc_timestamp)


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("3s", 3.0),
        ("250ms", 0.25),
        ("9ms", 0.009),
        ("1m", 60.0),
        ("1.5m", 90.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        (".5s", 0.5),
        ("0.5", 0.5),
        ("10", 10.0),
        (" 2 s ", 2.0),
        ("\t2s\n", 2.0),
        ("007s", 7.0),
        (4, 4.0),
        (0.75, 0.75),
        (10**6, 1e6),
    ],
)
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value, "k") == seconds


@pytest.mark.parametrize(
    "value",
    [
        "",
        " ",
        "soon",
        "s",
        "2 days",
        "1d",
        "1S",  # units are lower case
        "1MS",
        "1.",
        "1.s",
        "1..5s",
        "1s2",
        "1s s",
        "2 s 3",
        "-1s",
        "+1s",
        "1e3",
        "1_000",
        "0x10",
        "nan",
        "inf",
        "\uff11s",  # fullwidth 1
        "\u00b2s",  # superscript 2
        "\u0661s",  # Arabic-Indic 1
        "1\u00a0s",  # no-break space
        "\u20032s",  # em space
        True,
        False,
        None,
        b"1s",
        [1],
        {"s": 1},
    ],
)
def test_not_a_duration(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration(value, "health_check.interval")
    assert info.value.key == "health_check.interval"
    assert "expected a duration such as '250ms', '2s' or '1m'" in info.value.problem
    assert repr(value) in info.value.problem


@pytest.mark.parametrize(
    "value", [-1, -0.5, -(10**9), math.nan, math.inf, -math.inf, 10**400, "9" * 400]
)
def test_negative_and_non_finite_durations_are_refused(value: object) -> None:
    for allow_zero in (False, True):
        with pytest.raises(ConfigError) as info:
            parse_duration(value, "k", allow_zero=allow_zero)
        assert info.value.problem.startswith("must be a finite, non-negative duration")


@pytest.mark.parametrize("value", ["0", "0s", "0ms", "0.0h", ".0", 0, 0.0, "000"])
def test_zero_only_where_allowed(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration(value, "timeouts.connect")
    assert str(info.value) == "timeouts.connect: must be greater than zero"
    assert parse_duration(value, "timeouts.idle", allow_zero=True) == 0


UNITS = {"ms": 1 / 1000, "s": 1.0, "m": 60.0, "h": 3600.0, "": 1.0}


@settings(max_examples=300)
@given(
    st.integers(min_value=0, max_value=10**9),
    st.sampled_from(sorted(UNITS)),
    st.text(alphabet=" \t\r\n", max_size=3),
    st.text(alphabet=" \t", max_size=2),
    st.text(alphabet=" \t\r\n", max_size=3),
)
@example(250, "ms", "", "", "")
@example(9, "ms", "", "", "")  # '9ms' must be 0.009, the float a user gets from writing it
def test_whole_numbers_with_any_unit_and_padding(
    n: int, unit: str, before: str, between: str, after: str
) -> None:
    seconds = parse_duration(f"{before}{n}{between}{unit}{after}", "k", allow_zero=True)
    if unit == "ms":
        assert seconds == n / 1000  # divided, not multiplied by 0.001
    else:
        assert seconds == n * UNITS[unit]


@given(st.floats(min_value=0, allow_nan=False, allow_infinity=False))
def test_numbers_are_seconds(value: float) -> None:
    assert parse_duration(value, "k", allow_zero=True) == value


DURATION_LIKE = st.text(alphabet="0123456789.smh \t-+e\u00b2\uff10\u0660\u00a0", max_size=12)


@settings(max_examples=500)
@given(
    st.one_of(
        DURATION_LIKE,
        st.text(max_size=20),
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(),
        st.binary(max_size=4),
    ),
    st.booleans(),
)
def test_a_duration_or_a_config_error_never_anything_else(value: object, zero: bool) -> None:
    seconds = outcome(lambda: parse_duration(value, "k", allow_zero=zero))
    if isinstance(seconds, ConfigError):
        assert seconds.key == "k"
        return
    assert math.isfinite(seconds)
    assert seconds > 0 or (zero and seconds == 0)
    if isinstance(value, str):
        assert value.isascii()  # other scripts' digits and spaces never get through


# --------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:80", Address("127.0.0.1", 80)),
        ("0.0.0.0:8443", Address("0.0.0.0", 8443)),
        ("localhost:9100", Address("localhost", 9100)),
        ("proxy:1", Address("proxy", 1)),
        ("u1.lab.example:65535", Address("u1.lab.example", 65535)),
        ("  upstream-1:8000 \n", Address("upstream-1", 8000)),
        ("host:08000", Address("host", 8000)),  # one port, however it is spelled
        ("host:0000000080", Address("host", 80)),
        ("[::1]:8000", Address("::1", 8000)),
        ("[0:0::1]:8000", Address("::1", 8000)),  # one spelling per IPv6 address
        ("[2001:DB8:0:0:0:0:0:1]:443", Address("2001:db8::1", 443)),
        ("[fe80::1%eth0]:80", Address("fe80::1%eth0", 80)),
        ("[::]:0", Address("::", 0)),
    ],
)
def test_addresses(text: str, expected: Address) -> None:
    assert parse_address(text, "k", allow_port_zero=True) == expected
    if expected.port:
        assert parse_address(text, "k") == expected


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("", "expected an address 'host:port'"),
        ("   ", "expected an address 'host:port'"),
        (None, "expected an address 'host:port'"),
        (8000, "expected an address 'host:port'"),
        (b"h:80", "expected an address 'host:port'"),
        ("8000", "expected an address 'host:port'"),
        ("host", "expected an address 'host:port'"),
        (":80", "expected an address 'host:port'"),
        ("host:", "port must be a number from 1 to 65535, got ''"),
        ("::1:80", "write IPv6 addresses as '[::1]:80'"),
        ("[::1]", "expected '[ipv6]:port'"),
        ("[::1]80", "expected '[ipv6]:port'"),
        ("[::1:80", "expected '[ipv6]:port'"),
        ("[nope]:1", "'nope' is not an IPv6 address"),
        ("[127.0.0.1]:80", "'127.0.0.1' is not an IPv6 address"),
        ("[]:80", "'' is not an IPv6 address"),
        ("my host:80", "'my host' is not a host name or address"),
        ("host\t:80", "'host\\t' is not a host name or address"),
        ("h:65536", "port must be a number from 1 to 65535, got '65536'"),
        ("h:99999", "port must be a number from 1 to 65535"),
        ("h:100000", "port must be a number from 1 to 65535"),
        ("h:-1", "port must be a number from 1 to 65535, got '-1'"),
        ("h:+80", "port must be a number from 1 to 65535"),
        ("h: 80", "port must be a number from 1 to 65535"),
        ("h:80 80", "port must be a number from 1 to 65535"),
        ("h:8o", "port must be a number from 1 to 65535"),
        ("h:0x50", "port must be a number from 1 to 65535"),
        ("h:80.0", "port must be a number from 1 to 65535"),
        ("h:\uff18\uff10", "port must be a number from 1 to 65535"),  # fullwidth 80
        ("h:\u00b2", "port must be a number from 1 to 65535"),  # superscript 2
        ("h:8\u00b2", "port must be a number from 1 to 65535"),
        ("h:\u0668\u0660", "port must be a number from 1 to 65535"),  # Arabic-Indic 80
        ("h:" + "9" * 5000, "port must be a number from 1 to 65535"),  # never int()'d
        ("[::1]:\uff18\uff10", "port must be a number from 1 to 65535"),
    ],
)
def test_not_an_address(value: object, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_address(value, "upstreams[0]")
    assert info.value.key == "upstreams[0]"
    assert problem in info.value.problem


def test_port_zero_only_where_a_listener_may_take_any_free_port() -> None:
    with pytest.raises(ConfigError, match="port must be a number from 1 to 65535, got '0'"):
        parse_address("h:0", "k")
    with pytest.raises(ConfigError, match="port must be a number from 1 to 65535, got '00'"):
        parse_address("[::1]:00", "k")
    assert parse_address("h:0", "k", allow_port_zero=True) == Address("h", 0)
    with pytest.raises(ConfigError, match="port must be a number from 0 to 65535"):
        parse_address("h:65536", "k", allow_port_zero=True)
    assert parse_address("h:1", "k") == Address("h", 1)
    assert parse_address("h:65535", "k") == Address("h", 65535)


def _proxy_config(**raw: Any) -> l4proxy.config.Config:
    tls = {"ca": "ca.pem", "cert": "server.pem", "key": "server.key"}
    return l4proxy.config.parse_config({"tls": tls, **raw}, Path("/etc/l4proxy"))


def test_each_service_allows_port_zero_only_on_what_it_listens_on() -> None:
    # The proxy: its listener and the admin listener may; an upstream (dialled) may not.
    config = _proxy_config(listen="127.0.0.1:0", admin={"listen": "[::1]:0"}, upstreams=["u:1"])
    assert (config.listen.port, config.admin.listen) == (0, Address("::1", 0))
    with pytest.raises(ConfigError) as info:
        _proxy_config(upstreams=["127.0.0.1:0"])
    assert info.value.key == "upstreams[0]"
    # The upstream listens; the client connects.
    assert upstream.config.load_config(["--listen", "[::1]:0"], {}).port == 0
    with pytest.raises(ConfigError, match="--proxy: port must be a number from 1 to 65535"):
        client.config.load_config(["--id", "client.a", "--proxy", "proxy:0"])


def test_addresses_print_as_they_are_written() -> None:
    assert str(Address("10.0.0.1", 80)) == format_address("10.0.0.1", 80) == "10.0.0.1:80"
    assert str(Address("::1", 8000)) == format_address("::1", 8000) == "[::1]:8000"
    assert str(Address("u1", 8000)) == "u1:8000"


PORTS = st.integers(min_value=1, max_value=65535)
NAMES = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]{1,10}){0,3}", fullmatch=True)


@given(st.one_of(st.ip_addresses(v=4).map(str), NAMES), PORTS)
def test_names_and_ipv4_round_trip(host: str, port: int) -> None:
    address = parse_address(f"{host}:{port}", "k")
    assert address == Address(host, port)
    assert parse_address(str(address), "k") == address


@given(st.ip_addresses(v=6), PORTS)
def test_ipv6_round_trips_in_its_one_spelling(ip: ipaddress.IPv6Address, port: int) -> None:
    for spelling in (ip.compressed, ip.exploded, ip.exploded.upper()):
        address = parse_address(f"[{spelling}]:{port}", "k")
        assert address == Address(str(ip), port)
        assert str(address) == f"[{ip}]:{port}"
        assert parse_address(str(address), "k") == address


@given(st.integers(min_value=-(10**6), max_value=10**6), st.booleans())
def test_the_port_range(port: int, zero: bool) -> None:
    lowest = 0 if zero else 1
    if lowest <= port <= 65535:
        assert parse_address(f"h:{port}", "k", allow_port_zero=zero).port == port
    else:
        with pytest.raises(ConfigError, match=f"port must be a number from {lowest} to 65535"):
            parse_address(f"h:{port}", "k", allow_port_zero=zero)


ADDRESS_LIKE = st.text(alphabet="[]:.0123456789abcdef \t%\u00b2\uff10\u0660-", max_size=24)


@settings(max_examples=500)
@given(st.one_of(ADDRESS_LIKE, st.text(max_size=30), st.none(), st.integers()), st.booleans())
def test_an_address_or_a_config_error_never_anything_else(value: object, zero: bool) -> None:
    address = outcome(lambda: parse_address(value, "k", allow_port_zero=zero))
    if isinstance(address, ConfigError):
        assert address.key == "k"
        return
    assert (0 if zero else 1) <= address.port <= 65535
    assert address.host
    assert address.host.isprintable()
    assert " " not in address.host
    assert parse_address(str(address), "k", allow_port_zero=zero) == address  # idempotent


# -------------------------------------------------------------------------------- logs

TS = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")


class Stream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def test_utc_timestamp_is_iso_8601_utc_with_milliseconds() -> None:
    before = datetime.now(UTC)
    text = utc_timestamp()
    after = datetime.now(UTC)
    assert TS.fullmatch(text), text
    when = datetime.fromisoformat(text)
    assert when.utcoffset() == timedelta(0)
    assert before - timedelta(milliseconds=1) <= when <= after


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@given(JSON_VALUES)
def test_the_log_encoder_writes_what_json_dumps_writes(value: object) -> None:
    """The encoder made once gives json.dumps' compact text, and refuses NaN alike."""
    try:
        expected = json.dumps(value, separators=(",", ":"), default=str, allow_nan=False)
    except ValueError:
        with pytest.raises(ValueError, match="JSON"):
            to_json(value)
        return
    assert to_json(value) == expected


def test_the_log_encoder_writes_unknown_values_as_their_text() -> None:
    assert to_json({"at": Path("/x"), "b": b"\x01"}) == '{"at":"/x","b":"b\'\\\\x01\'"}'


def test_timestamps_in_the_same_second_share_their_prefix_and_keep_order() -> None:
    stamps = [utc_timestamp() for _ in range(200)]
    assert all(TS.fullmatch(s) for s in stamps)
    assert stamps == sorted(stamps)


def test_a_line_is_one_compact_object_ts_and_event_first_flushed() -> None:
    stream = Stream()
    log = JsonLog(stream)
    log.emit("listening", address="127.0.0.1:8443", count=3, ok=True, none=None)
    log.emit("stopped")
    lines = stream.getvalue().split("\n")
    assert lines[-1] == ""  # every line ends with a newline
    first, second = (json.loads(line) for line in lines[:-1])
    assert list(first) == ["ts", "event", "address", "count", "ok", "none"]
    assert first["event"] == "listening"
    assert (first["count"], first["ok"], first["none"]) == (3, True, None)
    assert TS.fullmatch(first["ts"])
    assert list(second) == ["ts", "event"]
    assert ", " not in lines[0]  # compact separators
    assert ": " not in lines[0]
    assert stream.flushes == 2  # each line is flushed as it is written


def test_values_json_cannot_hold_are_written_as_text() -> None:
    stream = io.StringIO()
    JsonLog(stream).emit("x", path=Path("/certs/ca.pem"), address=Address("::1", 1))
    record = json.loads(stream.getvalue())
    assert (record["path"], record["address"]) == ("/certs/ca.pem", "[::1]:1")


def test_every_line_is_valid_json_nan_and_infinity_as_text() -> None:
    stream = io.StringIO()
    JsonLog(stream).emit("x", ratio=float("nan"), rates=[1.5, float("inf")], m={"a": -math.inf})
    text = stream.getvalue()
    assert "NaN" not in text
    assert "Infinity" not in text
    record = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in {text}"))
    assert (record["ratio"], record["rates"], record["m"]) == ("nan", [1.5, "inf"], {"a": "-inf"})


def test_a_field_cannot_overwrite_ts_or_event() -> None:
    stream = io.StringIO()
    with pytest.raises(ValueError, match="'ts'"):
        JsonLog(stream).emit("x", ts="2000-01-01T00:00:00.000Z")
    with pytest.raises(ValueError, match="'event'"):
        JsonLog(stream).emit("x", event="other")
    assert stream.getvalue() == ""


def test_the_default_stream_is_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    JsonLog().emit("hello", n=1)
    assert json.loads(capsys.readouterr().out)["event"] == "hello"


class Broken(io.StringIO):
    def write(self, _text: str) -> int:
        raise BrokenPipeError


def test_a_reader_that_is_gone_is_not_an_error() -> None:
    closed = io.StringIO()
    closed.close()
    JsonLog(closed).emit("stopped")  # ValueError: I/O operation on closed file
    JsonLog(Broken()).emit("stopped")  # the reader exited


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
FIELD_NAMES = st.text(min_size=1).filter(lambda name: name not in ("ts", "event"))


@given(st.text(), st.dictionaries(FIELD_NAMES, JSON_VALUES, max_size=5))
def test_any_event_and_fields_make_one_line_that_reads_back(
    event: str, fields: dict[str, Any]
) -> None:
    stream = io.StringIO()
    JsonLog(stream).emit(event, **fields)
    text = stream.getvalue()
    assert text.endswith("\n")
    assert text.count("\n") == 1
    record = json.loads(text)
    assert list(record)[:2] == ["ts", "event"]
    assert record["event"] == event
    assert {k: v for k, v in record.items() if k not in ("ts", "event")} == fields
