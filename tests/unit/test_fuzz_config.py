"""Fuzzing the configuration parsers, counted.

Targets and inputs per run (Hypothesis ``max_examples``; each docstring repeats it):

* ``l4proxy.config.parse_config(raw, base_dir)``: documents built from the real key
  grammar with values of every type ......................... PROXY_DOC_EXAMPLES
* ``l4proxy.config.read_config(path)`` (``_parse_text``): YAML text, from dumped documents
  mutated with YAML's sharp edges, hand-written lines, and raw bytes ... PROXY_TEXT_EXAMPLES
* ``upstream.config.load_config(argv, environ)`` ............... UPSTREAM_EXAMPLES
* ``client.config.load_config(argv)`` ............................ CLIENT_EXAMPLES

The property, everywhere: the result is a ``Config`` whose values are in range, or a
``ConfigError`` whose ``key`` names a real key (the proxy: a key path of the grammar, with
an index that exists, or the path of an unknown key the input really has, or ``""``; the
services: one of their options, with its environment variable) -- never another exception.
The services' ``load_config`` may also end in ``SystemExit(2)``: argparse's documented
answer to bad syntax (a missing value, an unknown option, ``--count x``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import ipaddress
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

import client.config as client_config
import upstream.config as upstream_config
from l4proxy import config as proxy_config
from l4proxy.config import (
    ACTIONS,
    BALANCERS,
    IDENTITY_CHARSETS,
    IDENTITY_SOURCES,
    ON_RELOAD,
    PROXY_PROTOCOLS,
    Config,
    ConfigError,
    check_files,
    member_name,
    parse_address,
    parse_config,
    read_config,
    restart_needed,
)
from l4proxy.identity import normalize_identity

# No "explain" phase: it re-runs a failing case hundreds of times to annotate it.
PHASES = (Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink)
PROXY_DOC_EXAMPLES = 2000
PROXY_TEXT_EXAMPLES = 600
UPSTREAM_EXAMPLES = 1500
CLIENT_EXAMPLES = 1500

# --- the proxy's key grammar -----------------------------------------------------------------

TOP_KEYS: tuple[str, ...] = proxy_config._TOP_KEYS  # the parser's own list
SECTIONS: dict[str, tuple[str, ...]] = {
    "tls": ("ca", "cert", "key", "identity", "identity_charset"),
    "health_check": ("interval", "timeout", "rise", "fall"),
    "rate_limit": ("enabled", "rate", "burst", "cleanup_interval", "max_concurrent"),
    "authorization": ("default", "rules", "on_reload"),
    "timeouts": ("handshake", "connect", "idle", "drain", "close", "max_lifetime"),
    "admin": ("listen",),
}
UPSTREAM_KEYS = ("address", "discover", "name", "proxy_protocol")
RULE_KEYS = ("client", "action", "upstream")
# What each leaf holds: the kind of value its parser wants.
LEAVES: dict[str, str] = {
    "listen": "address",
    "balancer": "balancer",
    "max_connections": "int",
    "max_handshakes": "int",
    "proxy_protocol": "proxy_protocol",
    "workers": "workers",
    "tls.ca": "path",
    "tls.cert": "path",
    "tls.key": "path",
    "tls.identity": "identity_source",
    "tls.identity_charset": "identity_charset",
    "health_check.interval": "duration",
    "health_check.timeout": "duration",
    "health_check.rise": "int",
    "health_check.fall": "int",
    "rate_limit.enabled": "bool",
    "rate_limit.rate": "number",
    "rate_limit.burst": "int",
    "rate_limit.cleanup_interval": "duration",
    "rate_limit.max_concurrent": "int",
    "authorization.default": "action",
    "authorization.on_reload": "on_reload",
    "timeouts.handshake": "duration",
    "timeouts.connect": "duration",
    "timeouts.idle": "duration",
    "timeouts.drain": "duration",
    "timeouts.close": "duration",
    "timeouts.max_lifetime": "duration",
    "admin.listen": "address",
}


def test_the_grammar_here_is_the_parsers() -> None:
    """Every key this file generates is one the parser knows (else the fuzzing below
    would mostly exercise "unknown key")."""
    assert set(TOP_KEYS) == {k.split(".")[0] for k in LEAVES} | {"upstreams"}
    assert set(SECTIONS) <= set(TOP_KEYS)
    for section, keys in SECTIONS.items():
        for key in keys:
            raw = minimal_doc()
            raw[section] = {**raw.get(section, {}), key: None}
            problem = ""
            try:
                parse_config(raw, Path("/base"))
            except ConfigError as exc:
                problem = exc.problem
            assert "unknown key" not in problem, (section, key, problem)


def minimal_doc() -> dict[str, Any]:
    return {"tls": {"ca": "ca.pem", "cert": "s.pem", "key": "s.key"}, "upstreams": ["h:1"]}


# --- values ----------------------------------------------------------------------------------

HUGE_INTS = st.sampled_from([10**400, -(10**400), 2**1024, 10**308 * 10, 2**63, -(2**63)])
FLOATS = st.floats(allow_nan=True, allow_infinity=True)
UNICODE = st.text(max_size=12)  # any code point but surrogates
NUMBERS_TEXT = [
    "0", "1", "3", "250", "0.5", ".5", "1.", "1e9", "1E3", "9" * 400, "9" * 5000,
    "\u00b2", "\u0663", "\uff18", "1_000", "0x10", "nan", "inf", "", "00", "1.5.5",
]  # fmt: skip
DURATION_TEXT = st.builds(
    lambda sign, number, space, unit: sign + number + space + unit,
    st.sampled_from(["", "", "-", "+", " "]),
    st.sampled_from(NUMBERS_TEXT),
    st.sampled_from(["", "", " ", "\t", "\u00a0", "\u2003"]),
    st.sampled_from(["", "s", "ms", "m", "h", "d", "S", "MS", "sec", "\u00b2s", "h ", "s\n"]),
)
PORT_TEXT = st.sampled_from([
    "0", "1", "80", "08000", "65535", "65536", "99999999999999999999", "9" * 5000, "-1",
    "+80", " 80", "80 ", "\u00b2", "\u0663\u0663", "\uff18\uff10", "", "0x50", "8_0",
])  # fmt: skip
HOSTS = [
    "127.0.0.1", "0.0.0.0", "localhost", "h", "[::1]", "[::]", "::1", "[fe80::1%eth0]",
    "[0:0::1]", "[not-v6]", "[", "]", "", " ", "h h", "caf\u00e9", "\u202eh", "300.1.1.1",
    "[::ffff:127.0.0.1]",
]  # fmt: skip
ADDRESS_TEXT = st.builds(
    lambda host, sep, port: host + sep + port,
    st.sampled_from(HOSTS) | UNICODE,
    st.sampled_from([":", ":", "::", ""]),
    PORT_TEXT,
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | HUGE_INTS
    | FLOATS
    | UNICODE
    | DURATION_TEXT
    | ADDRESS_TEXT
    | st.sampled_from(["", " ", "*", "yes", "no", "~", "null", "true", "\u00b2s", "1e9h", "a\0b"])
)
anything = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(scalars, inner, max_size=3),
    max_leaves=8,
)


def choice_values(choices: Sequence[str]) -> st.SearchStrategy[object]:
    options = list(choices)
    return st.sampled_from(
        [*(c.upper() for c in options), *(f" {c} " for c in options), "", "none", "v1", "Deny"]
    )


# Values a key accepts...
VALID: dict[str, st.SearchStrategy[object]] = {
    "address": st.sampled_from(["127.0.0.1:8000", "[::1]:9100", "localhost:0", "h:65535"]),
    "duration": st.sampled_from(["3s", "250ms", "1m", "0.5", ".5", "1h", 1, 2.5, " 2 s "]),
    "int": st.integers(0, 1000),
    "number": st.floats(0.001, 1e6) | st.integers(1, 1000),
    "bool": st.booleans(),
    "path": st.sampled_from(["ca.pem", "/abs/ca.pem", "certs/x.pem", "\u00e9.pem"]),
    "balancer": st.sampled_from(BALANCERS),
    "proxy_protocol": st.sampled_from(PROXY_PROTOCOLS),
    "identity_source": st.sampled_from(IDENTITY_SOURCES),
    "identity_charset": st.sampled_from(IDENTITY_CHARSETS),
    "action": st.sampled_from(ACTIONS),
    "on_reload": st.sampled_from(ON_RELOAD),
    "workers": st.integers(1, 64) | st.just("auto"),
}
# ...and values of its kind that are subtly wrong, or right at an edge.
TRICKY: dict[str, st.SearchStrategy[object]] = {
    "address": ADDRESS_TEXT | st.sampled_from(["", None, 8000, ["h:1"]]),
    "duration": DURATION_TEXT
    | st.integers(-5, 10**6)
    | FLOATS
    | HUGE_INTS
    | st.sampled_from([True, False, "1e9h", "\u00b2s", "0", 0, 0.0, -0.0, "1d"]),
    "int": st.integers(-3, 3) | HUGE_INTS | st.sampled_from([True, 1.0, 2.5, "5", math.nan]),
    "number": FLOATS | st.integers(-3, 3) | HUGE_INTS | st.sampled_from(["2", True, 0]),
    "bool": st.sampled_from(["yes", "true", 0, 1, None, "True"]),
    "workers": st.integers(-1, 70) | st.sampled_from(["AUTO", "2", 2.0, True, None, "auto "]),
    "path": st.sampled_from(["", " ", "a\0b", "../up.pem", "/"]) | UNICODE | st.integers(),
    **{
        kind: choice_values(choices)
        for kind, choices in (
            ("balancer", BALANCERS),
            ("proxy_protocol", PROXY_PROTOCOLS),
            ("identity_source", IDENTITY_SOURCES),
            ("identity_charset", IDENTITY_CHARSETS),
            ("action", ACTIONS),
            ("on_reload", ON_RELOAD),
        )
    },
}
# The value a fuzzed key gets: tricky mostly, sometimes anything at all.
FUZZED = {kind: st.one_of(TRICKY[kind], TRICKY[kind], VALID[kind], anything) for kind in VALID}
# In "chaos" documents every key gets one of these.
MIXED = {kind: st.one_of(VALID[kind], TRICKY[kind], anything) for kind in VALID}

NAMES = st.sampled_from(
    ["u1", "u2", "web-2", "a.b-c_d", "", " u1 ", "-bad", "x" * 63, "x" * 64, "\u00fcn\u00ef"]
) | UNICODE  # fmt: skip
CLIENT_NAMES = [
    "client.a", "Client.A", "*", "client.a ", "\u0441lient.a", "Stra\u00dfe", "STRASSE",
    "e\u0301", "\u00e9", "", " ", "a\u200bb", "\ud800", "client.b",
]  # fmt: skip
CLIENTS = st.sampled_from(CLIENT_NAMES)
CLIENT_VALUES = st.one_of(CLIENTS, CLIENTS, st.lists(CLIENTS, max_size=3), anything)
VALID_UPSTREAMS = st.lists(
    st.sampled_from(["127.0.0.1:8000", "[::1]:8000", "h:1"])
    | st.fixed_dictionaries(
        {"address": st.sampled_from(["10.0.0.1:80", "[2001:db8::1]:443", "web:8080"])},
        optional={
            "name": st.sampled_from(["u1", "u2", "web-2"]),
            "proxy_protocol": st.sampled_from(PROXY_PROTOCOLS),
        },
    )
    | st.fixed_dictionaries(
        {
            "discover": st.sampled_from(["tasks.up:8000", "svc:80", "[fd00::53]:9000"]),
            "name": st.sampled_from(["up", "grp", "u1"]),
        },
        optional={"proxy_protocol": st.sampled_from(PROXY_PROTOCOLS)},
    ),
    min_size=1,
    max_size=3,
    unique_by=lambda u: str(u.get("address", u.get("discover")) if isinstance(u, dict) else u),
)
VALID_TLS = st.fixed_dictionaries(
    {"ca": VALID["path"], "cert": VALID["path"], "key": VALID["path"]},
    optional={
        "identity": VALID["identity_source"],
        "identity_charset": VALID["identity_charset"],
    },
)
TARGET_SPELLINGS = ["*", "localhost:08000", "[0:0::1]:8000", "h:\u00b2", "127.0.0.1:08000", "u1"]
# Members of discovered groups, by address (a group's port or not) and by name.
MEMBER_SPELLINGS = [
    "10.0.1.7:8000",
    "10.0.1.7:81",
    "[fd00:0::7]:9000",
    "up@10.0.1.7",
    "grp@[fd00::7]",
    "up@x",
]
INDEX = st.integers(0, 1 << 10)  # taken modulo a list's length
ODDS = st.integers(0, 99)  # percent
EXTRA_KEY = (
    st.sampled_from(["Listen", "timeout", "upstream", "tls ", "", "rules", "ADDRESS"]) | scalars
)
LEAF_PATHS = sorted(LEAVES)
FOCUS = st.lists(
    st.sampled_from([*LEAF_PATHS, "upstreams", "upstream-entry", "rules", "rule-entry", "extra"]),
    min_size=1,
    max_size=3,
)


def upstream_targets(ups: object) -> list[str]:
    """The names and addresses a rule can refer to (as written)."""
    found: list[str] = []
    if isinstance(ups, list):
        for item in ups:
            if isinstance(item, str):
                found.append(item)
            elif isinstance(item, Mapping):
                found += [
                    v for k, v in item.items() if k in ("address", "name") and isinstance(v, str)
                ]
    return found


def draw_upstream_entry(draw: st.DrawFn, odds: int) -> object:
    """One upstream entry, wrong in some way with ``odds`` percent for each part."""
    if draw(ODDS) < 30:
        return draw(st.one_of(ADDRESS_TEXT, VALID["address"], anything))
    entry: dict[object, object] = {}
    if draw(ODDS) >= odds // 3:
        entry["address"] = draw(FUZZED["address"] if draw(ODDS) < odds else VALID["address"])
    if draw(ODDS) < 25:  # a discovered group (and now and then an address as well)
        entry["discover"] = draw(FUZZED["address"] if draw(ODDS) < odds else VALID["address"])
        if draw(ODDS) >= odds // 3:
            entry.pop("address", None)
    if draw(ODDS) < 50:
        entry["name"] = draw(NAMES | anything if draw(ODDS) < odds else NAMES)
    if draw(ODDS) < 50:
        kind = FUZZED if draw(ODDS) < odds else VALID
        entry["proxy_protocol"] = draw(kind["proxy_protocol"])
    if draw(ODDS) < odds // 5:
        entry[draw(EXTRA_KEY)] = draw(anything)
    return entry


def draw_rule(draw: st.DrawFn, targets: list[str], odds: int) -> object:
    """One authorization rule, wrong in some way with ``odds`` percent for each part."""
    rule: dict[object, object] = {}
    names = [*targets, *TARGET_SPELLINGS, *MEMBER_SPELLINGS]

    def target() -> str:
        return names[draw(INDEX) % len(names)] if draw(ODDS) < 80 else "*"

    fuzz = draw(ODDS) < odds
    rule["client"] = draw(CLIENT_VALUES if fuzz else st.sampled_from(["client.a", "*"]))
    rule["action"] = draw(FUZZED["action"] if draw(ODDS) < odds else VALID["action"])
    if draw(ODDS) < odds:
        rule["upstream"] = draw(anything) if draw(ODDS) < 30 else [target() for _ in range(3)]
    else:
        rule["upstream"] = target() if draw(ODDS) < 50 else [target(), target()]
    if draw(ODDS) < odds // 3:
        del rule[("client", "action", "upstream")[draw(INDEX) % 3]]
    if draw(ODDS) < odds // 5:
        rule[draw(EXTRA_KEY)] = draw(anything)
    return rule


@st.composite
def documents(draw: st.DrawFn) -> object:
    """A decoded YAML document from the real grammar.

    Two in three are *focused*: a valid document in which one to three places are fuzzed
    (a leaf, the upstream list or an entry, the rules or a rule, a foreign key), so the
    parser gets past the keys it reads first. The rest are *chaos*: every key present
    or not, each value valid, tricky or anything, and one in twenty not a mapping."""
    chaos = draw(ODDS) < 33
    if chaos and draw(ODDS) < 5:
        return draw(anything)
    focus = set() if chaos else set(draw(FOCUS))
    odds = 60 if chaos else 0  # percent: how often each part is made wrong

    ups: object
    if "upstreams" in focus:
        ups = draw(st.one_of(anything, st.just([])))
    elif chaos or "upstream-entry" in focus:
        ups = draw(VALID_UPSTREAMS)
        assert isinstance(ups, list)
        at = draw(INDEX) % (len(ups) + 1)
        ups[at:at] = [draw_upstream_entry(draw, 70)]
    else:
        ups = draw(VALID_UPSTREAMS)
    doc: dict[object, object] = {"upstreams": ups, "tls": draw(VALID_TLS)}
    targets = upstream_targets(ups)

    for path in LEAF_PATHS:
        section, _, key = path.rpartition(".")
        fuzzed = path in focus or (chaos and draw(ODDS) < odds)
        present = path in focus or draw(ODDS) < (50 if chaos else 25)
        if not present and not (section == "tls" and key in ("ca", "cert", "key")):
            continue
        value = draw((MIXED if chaos else FUZZED)[LEAVES[path]] if fuzzed else VALID[LEAVES[path]])
        if not section:
            doc[key] = value
        else:
            holder = doc.setdefault(section, {})
            if isinstance(holder, dict):
                holder[key] = value
    if "rules" in focus or "rule-entry" in focus or draw(ODDS) < (50 if chaos else 20):
        auth = doc.setdefault("authorization", {})
        assert isinstance(auth, dict)
        if "rules" in focus:
            auth["rules"] = draw(anything)
        else:
            count = draw(INDEX) % 4
            rule_odds = odds if "rule-entry" not in focus else 50
            auth["rules"] = [draw_rule(draw, targets, rule_odds) for _ in range(count + 1)]
    if chaos:
        for section in SECTIONS:
            if draw(ODDS) < 5:
                doc[section] = draw(anything)  # a section that is not a mapping
        if draw(ODDS) < 10:
            doc.pop(("tls", "upstreams")[draw(INDEX) % 2], None)
    if "extra" in focus or (chaos and draw(ODDS) < 10):
        where = draw(st.sampled_from(["", *SECTIONS]))
        holder = doc.setdefault(where, {}) if where else doc
        if isinstance(holder, dict):
            holder[draw(EXTRA_KEY)] = draw(anything)
    for path in focus:
        event(f"focus {path}")
    return doc


# --- the property ----------------------------------------------------------------------------


def error_keys(raw: object) -> set[str]:
    """Every key path a ConfigError about ``raw`` may name."""
    paths = {"", *TOP_KEYS, *(f"{s}.{k}" for s, keys in SECTIONS.items() for k in keys)}
    if not isinstance(raw, Mapping):
        return paths
    paths |= {str(name) for name in raw if name not in TOP_KEYS}
    for section, keys in SECTIONS.items():
        value = raw.get(section)
        if isinstance(value, Mapping):
            paths |= {f"{section}.{name}" for name in value if name not in keys}
    for where, items, keys in (
        ("upstreams", raw.get("upstreams"), UPSTREAM_KEYS),
        (
            "authorization.rules",
            raw["authorization"].get("rules")
            if isinstance(raw.get("authorization"), Mapping)
            else None,
            RULE_KEYS,
        ),
    ):
        if not isinstance(items, list):
            continue
        for i, item in enumerate(items):
            paths |= {f"{where}[{i}]", *(f"{where}[{i}].{k}" for k in keys)}
            if isinstance(item, Mapping):
                paths |= {f"{where}[{i}].{name}" for name in item}
    return paths


def check_error(exc: ConfigError, raw: object) -> None:
    assert isinstance(exc.problem, str)
    assert exc.problem
    assert str(exc) == (f"{exc.key}: {exc.problem}" if exc.key else exc.problem)
    assert exc.key in error_keys(raw), (exc.key, exc.problem)
    shape = re.sub(r"\[\d+\]", "[]", exc.key) or "(document)"
    event(f"ConfigError at {shape}")


def names_a_member(target: str, config: Config) -> bool:
    """``target`` is how a rule names one member of a discovered group, canonically:
    ``IP:PORT`` with a group's port, or ``GROUP@IP`` (``GROUP@[IPv6]``)."""
    group, at, ip = target.rpartition("@")
    if at:
        if group not in {g.name for g in config.groups}:
            return False
        bare = ip[1:-1] if ip.startswith("[") else ip
        return member_name(group, str(ipaddress.ip_address(bare))) == target
    address = parse_address(target, "rule")
    ipaddress.ip_address(address.host)
    return str(address) == target and address.port in {g.address.port for g in config.groups}


def check_config(config: Config) -> None:
    """A Config that parsed holds values in range."""
    assert isinstance(config, Config)
    assert 0 <= config.listen.port <= 65535
    for upstream in config.upstreams:
        assert 1 <= upstream.address.port <= 65535
        assert upstream.proxy_protocol in PROXY_PROTOCOLS
    keys = [u.key for u in config.upstreams]
    names = [u.name for u in config.upstreams]
    assert len(set(keys)) == len(keys)
    assert len(set(names)) == len(names)
    groups = [g.name for g in config.groups]
    assert len(set(groups)) == len(groups)
    assert not set(groups) & set(names)
    for group in config.groups:
        assert 1 <= group.address.port <= 65535
        assert group.proxy_protocol in PROXY_PROTOCOLS
        assert group.address.host
    assert config.upstreams or config.groups
    durations = [
        config.health_check.interval,
        config.health_check.timeout,
        config.rate_limit.cleanup_interval,
        config.timeouts.handshake,
        config.timeouts.connect,
        config.timeouts.close,
    ]
    for value in durations:
        assert isinstance(value, float)
        assert math.isfinite(value)
        assert value > 0
    for value in (config.timeouts.idle, config.timeouts.drain, config.timeouts.max_lifetime):
        assert isinstance(value, float)
        assert math.isfinite(value)
        assert value >= 0
    assert math.isfinite(config.rate_limit.rate)
    assert config.rate_limit.rate > 0
    assert config.rate_limit.burst >= 1
    assert config.health_check.rise >= 1
    assert config.health_check.fall >= 1
    assert min(config.max_connections, config.max_handshakes, config.rate_limit.max_concurrent) >= 0
    assert 1 <= config.workers <= 64
    known = {*keys, *names, *groups, "*"}
    charset = config.tls.identity_charset
    for rule in config.authorization.rules:
        assert rule.upstreams
        assert all(t in known or names_a_member(t, config) for t in rule.upstreams), rule
        for name in rule.clients:
            assert name == "*" or normalize_identity(name, charset) == name
    admin = config.admin.listen
    assert admin is None or admin != config.listen or admin.port == 0
    restart_needed(config, config)  # a config never needs a restart to become itself
    missing = ""
    try:
        check_files(config)
    except ConfigError as exc:
        missing = exc.key
    assert missing in ("", "tls.ca", "tls.cert", "tls.key")
    event("Config")


@settings(
    max_examples=PROXY_DOC_EXAMPLES,
    deadline=None,
    phases=PHASES,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(documents())
def test_any_document_is_a_config_or_a_config_error_naming_a_real_key(raw: object) -> None:
    """PROXY_DOC_EXAMPLES (2,000) documents from the grammar (see ``documents``: two in
    three valid but for one to three fuzzed places, the rest chaos): every top key and
    section key, with values of the wanted kind, subtly wrong ones, or anything (None,
    bools, ints up to 10**400, floats with nan and inf, unicode text, durations like
    '1e9h', '\u00b2s', '\u0663s', 400 and 5,000 digits; addresses with ports '\u00b2',
    '08000', 5,000 digits; nested lists and mappings), misspelt and foreign keys, rules
    naming the generated upstreams by name or another spelling, non-mappings anywhere.
    A Config must hold values in range and pass ``check_files`` or fail it naming a
    ``tls`` key."""
    try:
        config = parse_config(raw, Path("/nonexistent/base"))
    except ConfigError as exc:
        check_error(exc, raw)
    else:
        check_config(config)


# --- YAML text -------------------------------------------------------------------------------

YAML_SHARP_EDGES = [
    "2001-02-30",  # a timestamp PyYAML resolves, for a day that does not exist
    "2001-13-01",
    "2001-02-03 25:00:00",
    "2001-02-03t10:00:00+99:00",
    "9" * 5000,  # an int of more digits than int() converts
    "1.0e+400",
    "0x1F",
    "0o17",
    "0b101",
    "1_000",
    "190:20:30",
    ".nan",
    "-.inf",
    "~",
    "!!binary aGVsbG8=",
    "!!set {a, b}",
    "!!python/object:os.system x",
    "!!str",
    "&a 5s",
    "*a",
    "*undefined",
    "<<: *a",
    "[",
    "{",
    "]",
    "}",
    "'",
    '"',
    '"\\ud800"',
    '"\\x00"',
    "|",
    ">-",
    "? a",
    "- x",
    "\t",
    "%YAML 1.1",
    "---",
    "...",
    "#",
    "\u00b2s",
    "1e9h",
    "'\u0663s'",
    "yes",
    "on",
    "NULL",
]


@st.composite
def yaml_texts(draw: st.DrawFn) -> bytes:
    """Bytes for a config file: a document dumped as YAML then cut up, lines written by
    hand from the grammar and YAML's sharp edges, deep nesting, or any bytes."""
    how = draw(st.sampled_from(["dumped", "dumped", "lines", "nested", "bytes"]))
    event(f"text {how}")
    if how == "bytes":
        return draw(st.binary(max_size=200))
    if how == "nested":
        depth = draw(st.integers(1, 1500))
        opener, closer = draw(st.sampled_from([("[", "]"), ("{a: ", "}"), ("- ", "")]))
        if opener == "- ":
            body = "".join("  " * i + "-\n" for i in range(depth)) + "  " * depth + "x\n"
        else:
            body = opener * depth + "1" + closer * depth
        return f"listen: {body}\n".encode() if draw(st.booleans()) else body.encode()
    if how == "lines":
        keys = [*TOP_KEYS, *(f"  {k}" for keys in SECTIONS.values() for k in keys), "- "]
        lines = draw(
            st.lists(
                st.builds(
                    lambda key, value: f"{key}: {value}",
                    st.sampled_from(keys),
                    st.sampled_from(YAML_SHARP_EDGES) | DURATION_TEXT | ADDRESS_TEXT,
                ),
                max_size=12,
            )
        )
        return "\n".join(lines).encode("utf-8", "surrogatepass")
    doc = draw(documents())
    try:
        text = yaml.safe_dump(doc, allow_unicode=draw(st.booleans()), sort_keys=False)
    except yaml.YAMLError:
        text = repr(doc)
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["insert", "delete", "line"]))
        if op == "insert":
            text = text[:at] + draw(st.sampled_from(YAML_SHARP_EDGES)) + text[at:]
        elif op == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 10)) :]
        else:
            edge = draw(st.sampled_from(YAML_SHARP_EDGES))
            key = draw(st.sampled_from(list(TOP_KEYS)))
            text = text[:at] + f"\n{key}: {edge}\n" + text[at:]
    return text.encode("utf-8", "surrogatepass")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-config")


@settings(
    max_examples=PROXY_TEXT_EXAMPLES,
    deadline=None,
    phases=PHASES,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=yaml_texts())
def test_any_file_is_a_config_or_a_config_error(scratch: Path, data: bytes) -> None:
    """PROXY_TEXT_EXAMPLES (600) files read by ``read_config``: generated documents
    dumped as YAML with up to three cuts or insertions of YAML's sharp edges (impossible
    dates, 5,000-digit ints, tags, anchors and aliases, unbalanced brackets, tabs,
    directives), lines written from the grammar, nesting up to 1,500 levels, any bytes."""
    path = scratch / "proxy.yaml"
    path.write_bytes(data)
    error: ConfigError | None = None
    try:
        config, digest = read_config(path)
    except ConfigError as exc:
        error = exc
    if error is None:
        check_config(config)
        assert digest == hashlib.sha256(data).hexdigest()
        return
    # The document, if it decodes at all (else only "" is a right key).
    raw = None
    if error.key:
        raw = yaml.safe_load(data.decode("utf-8"))
    check_error(error, raw)


# --- the lab's services: argv and environment ---------------------------------------------

ARG_TEXT = st.text(
    st.characters(codec="utf-8", exclude_characters="\x00")
    | st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF),  # undecodable argv bytes
    max_size=16,
)


ARG_ADDRESS = ADDRESS_TEXT.map(lambda text: text.replace("\0", ""))  # argv has no NUL


ARG_TRICKY: dict[str, st.SearchStrategy[str]] = {
    "address": ARG_ADDRESS,
    "duration": DURATION_TEXT,
    "size": st.builds(
        lambda n, u: n + u,
        st.sampled_from(["0", "1", "65536", "512", "4", "9" * 5000, "\u0663", "-1", ""]),
        st.sampled_from(["", "b", "k", "KiB", "M", "mib", "G", "gib", "T", " k"]),
    ),
    "int": st.sampled_from(["0", "1", "-1", "99", "9" * 5000, "\u0663", "x", ""]),
    "text": ARG_TEXT,
    "mode": st.sampled_from(["ECHO", " sink ", "none", ""]),
    "fault": st.sampled_from(["Reset", "crash", ""]),
    "proxy_protocol": st.sampled_from(["V2", "v1", ""]),
    "trusted": st.sampled_from(["1.2.3.4/99", "a..b", "1.2.3", "\u0663", "fe80::1%eth0", ","]),
}
ARG_VALID: dict[str, st.SearchStrategy[str]] = {
    "address": st.sampled_from(["127.0.0.1:0", "[::1]:8000", "h:1", "localhost:65535"]),
    "duration": st.sampled_from(["2s", "250ms", "0", "1", "0.5", "1m", "1h"]),
    "size": st.sampled_from(["65536", "4MiB", "512k", "1"]),
    "int": st.sampled_from(["1", "5", "1000"]),
    "text": st.sampled_from(["client.a", "u1", "certs", "x"]),
    "mode": st.sampled_from(["reply", "echo", "sink"]),
    "fault": st.sampled_from(["none", "close", "reset"]),
    "proxy_protocol": st.sampled_from(["v2", "v2", "none"]),  # trusted proxies need v2
    "trusted": st.sampled_from(["10.0.0.0/8", "127.0.0.1", "proxy", "::1"]),
}
# A fuzzed option: tricky mostly, sometimes valid or any text at all.
ARG_FUZZED = {
    kind: st.one_of(ARG_TRICKY[kind], ARG_TRICKY[kind], ARG_VALID[kind], ARG_TEXT)
    for kind in ARG_VALID
}
REPEATS = st.sampled_from([0, 0, 1, 1, 1, 2])


@st.composite
def command_lines(
    draw: st.DrawFn,
    options: dict[str, str],
    flags: Sequence[str] = (),
    environment: dict[str, str] | None = None,
    required: Sequence[str] = (),
) -> tuple[list[str], dict[str, str]]:
    """``options`` (name -> value kind) in random order, zero to two times each (the
    ``required`` ones at least once), as ``--opt value`` or ``--opt=value``; some of
    ``flags``; and an environment with some of ``environment`` (variable -> value kind).

    Two in three are *focused*: one or two options (or variables) get fuzzed values, the
    others valid ones, so the parser gets past the options it checks first. The rest are
    *chaos*: every value fuzzed with even odds."""
    environment = environment or {}
    chaos = draw(ODDS) < 33
    names = [*options, *environment]
    focus = set() if chaos else set(draw(st.lists(st.sampled_from(names), min_size=1, max_size=2)))

    def value(name: str, kind: str) -> str:
        fuzzed = name in focus or (chaos and draw(ODDS) < 50)
        return draw(ARG_FUZZED[kind] if fuzzed else ARG_VALID[kind])

    argv: list[str] = []
    for name in draw(st.permutations(list(options))):
        repeats = max(draw(REPEATS), 1 if name in focus or name in required else 0)
        for _ in range(repeats):
            text = value(name, options[name])
            if draw(st.booleans()):
                argv.append(f"{name}={text}")
            else:
                argv += [name, text]
    argv += [flag for flag in flags if draw(ODDS) < 30]
    environ = {
        name: value(name, kind)
        for name, kind in environment.items()
        if name in focus or draw(ODDS) < 30
    }
    for name in focus:
        event(f"focus {name}")
    return argv, environ


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """argparse writes its usage errors to stderr before exiting."""
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        yield


def option_keys(parser_options: Sequence[str], environment: Sequence[str]) -> set[str]:
    """An option alone, or with one of the service's environment variables."""
    return {*parser_options, *(f"{o}/{e}" for o in parser_options for e in environment)}


def run_service(load: Callable[[], object], keys: set[str]) -> object | None:
    """``load()``'s Config, or None after checking the error it raised."""
    error: ConfigError | SystemExit
    try:
        with quiet():
            return load()
    except (SystemExit, ConfigError) as exc:
        error = exc
    if isinstance(error, SystemExit):
        assert error.code == 2  # argparse: bad syntax
        event("SystemExit(2)")
    else:
        assert error.key in keys, (error.key, error.problem)
        assert error.problem
        event(f"ConfigError at {error.key}")
    return None


UPSTREAM_OPTIONS = {
    "--listen": "address",
    "--name": "text",
    "--mode": "mode",
    "--delay": "duration",
    "--fault": "fault",
    "--proxy-protocol": "proxy_protocol",
    "--trusted-proxy": "trusted",
    "--empty-log-interval": "duration",
    "--idle-timeout": "duration",
    "--control": "text",
}
UPSTREAM_VARIABLES = {
    upstream_config.ENV_LISTEN: "address",
    upstream_config.ENV_NAME: "text",
    upstream_config.ENV_MODE: "mode",
    upstream_config.ENV_DELAY: "duration",
    upstream_config.ENV_FAULT: "fault",
    upstream_config.ENV_PROXY_PROTOCOL: "proxy_protocol",
    upstream_config.ENV_TRUSTED_PROXIES: "trusted",
    upstream_config.ENV_CONTROL: "text",
}
UPSTREAM_ENV = [value for name, value in vars(upstream_config).items() if name.startswith("ENV_")]


@settings(
    max_examples=UPSTREAM_EXAMPLES,
    deadline=None,
    phases=PHASES,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(command_lines(UPSTREAM_OPTIONS, environment=UPSTREAM_VARIABLES))
def test_upstream_service_options(case: tuple[list[str], dict[str, str]]) -> None:
    """UPSTREAM_EXAMPLES (1,500) command lines and environments for the lab upstream:
    every option and ``UPSTREAM_*`` variable, one or two of them fuzzed (or all, in a
    third of the cases) with values of their kind that are wrong or at an edge (ports
    like '\u00b2' and 5,000 digits, durations like '1e9h', CIDRs like '/99') or any text
    (undecodable argv bytes as surrogate escapes)."""
    argv, environ = case
    options = [o for a in upstream_config.build_parser({})._actions for o in a.option_strings]
    config = run_service(
        lambda: upstream_config.load_config(argv, environ), option_keys(options, UPSTREAM_ENV)
    )
    if config is None:
        return
    assert isinstance(config, upstream_config.Config)
    event("Config")
    assert 0 <= config.port <= 65535
    for value in (config.delay, config.empty_log_interval, config.idle_timeout):
        assert math.isfinite(value)
        assert value >= 0
    assert config.mode in upstream_config.MODES
    assert config.fault in upstream_config.FAULTS
    assert config.proxy_protocol in upstream_config.PROXY_PROTOCOLS
    assert config.name.isprintable()
    assert len(config.name) <= 200


CLIENT_OPTIONS = {
    "--id": "text",
    "--proxy": "address",
    "--certs": "text",
    "--server-name": "text",
    "--interval-min": "duration",
    "--interval-max": "duration",
    "--timeout": "duration",
    "--seed": "int",
    "--count": "int",
    "--duration": "duration",
    "--concurrency": "int",
    "--transfer-bytes": "size",
    "--transfer-time": "duration",
    "--cert-stem": "text",
}


@settings(
    max_examples=CLIENT_EXAMPLES,
    deadline=None,
    phases=PHASES,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(command_lines(CLIENT_OPTIONS, ("--burst", "--no-cert"), required=("--id", "--proxy")))
def test_client_service_options(case: tuple[list[str], dict[str, str]]) -> None:
    """CLIENT_EXAMPLES (1,500) command lines for the synthetic client: every option, one
    or two of them fuzzed (or all, in a third of the cases) with values of their kind
    that are wrong or at an edge (sizes like '9'*5000 + 'KiB', durations like '1e9h',
    ports like '\u00b2', ints like '\u0663') or any text."""
    argv, _ = case
    options = [o for a in client_config.build_parser()._actions for o in a.option_strings]
    config = run_service(lambda: client_config.load_config(argv), set(options))
    if config is None:
        return
    assert isinstance(config, client_config.Config)
    event("Config")
    assert 1 <= config.port <= 65535
    assert 0 <= config.interval_min <= config.interval_max
    assert math.isfinite(config.interval_max)
    assert math.isfinite(config.timeout)
    assert config.timeout > 0
    assert config.concurrency >= 1
    assert config.count is None or config.count >= 1
    if config.transfer_bytes is not None:
        assert config.transfer_bytes >= 1
        assert 0 <= config.transfer_time < config.timeout
    assert 1 <= len(config.client_id) <= 200


# --- the bugs this fuzzing found, each on its own ----------------------------------------------

BASE_YAML = "tls: {ca: ca.pem, cert: s.pem, key: s.key}\nupstreams: ['127.0.0.1:8000']\n"


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({**minimal_doc(), "rate_limit": {"rate": 10**400}}, "rate_limit.rate"),
        ({**minimal_doc(), "rate_limit": {"rate": -(10**400)}}, "rate_limit.rate"),
    ],
    ids=["rate-10**400", "rate--10**400"],
)
def test_found_documents(raw: dict[str, Any], key: str) -> None:
    """Minimal inputs from the fuzzing above (an int beyond any float, as YAML gives for
    ``rate: 1000...0`` with 309+ digits)."""
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, Path("/base"))
    assert caught.value.key == key


@pytest.mark.parametrize(
    "text",
    [
        BASE_YAML + "listen: 2001-02-30\n",  # PyYAML: ValueError('day is out of range...')
        BASE_YAML + "timeouts: {idle: 2001-13-01}\n",  # ValueError('month must be in 1..12')
        BASE_YAML + "max_connections: " + "9" * 5000 + "\n",  # ValueError: int() digit limit
        "[" * 1000 + "]" * 1000,  # RecursionError in PyYAML's composer
    ],
    ids=["impossible-date", "impossible-month", "5000-digit-int", "nesting-1000"],
)
def test_found_files(scratch: Path, text: str) -> None:
    """Minimal files from the fuzzing above: each must be a ConfigError (the proxy's
    ``--check``, start-up and ``Proxy.reload`` catch exactly that), not whatever PyYAML's
    constructors raise."""
    path = scratch / "found.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError):
        read_config(path)


def test_found_client_size() -> None:
    """A minimal command line from the fuzzing above: ``--transfer-bytes`` of 5,000
    digits (``int()`` refuses more than 4,300)."""
    argv = ["--id", "a", "--proxy", "h:1", "--transfer-bytes", "9" * 5000]
    with pytest.raises(ConfigError) as caught:
        client_config.load_config(argv)
    assert caught.value.key == "--transfer-bytes"
