"""Unit tests for l4proxy.config: YAML in, frozen dataclasses out, every error names its key."""

from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from l4proxy.config import (
    Address,
    Config,
    ConfigError,
    Group,
    Rule,
    Upstream,
    check_files,
    load_config,
    parse_config,
    parse_duration,
    read_config,
    restart_needed,
)

BASE_DIR = Path("/etc/layer4lab")

EXAMPLE_YAML = textwrap.dedent(
    """\
    listen: "127.0.0.1:9443"
    tls:
      ca: certs/ca.pem
      cert: certs/server.pem
      key: /secrets/server.key
      identity: san_uri
    upstreams:
      - "127.0.0.1:8000"
      - address: "127.0.0.1:8001"
        name: web-2
      - "[::1]:8000"
    balancer: round_robin
    health_check:
      interval: 3s
      timeout: 250ms
      rise: 2
      fall: 3
    rate_limit:
      enabled: true
      rate: 5
      burst: 10
      cleanup_interval: 1m
      max_concurrent: 3
    authorization:
      default: deny
      rules:
        - client: client.a
          action: deny
          upstream: "127.0.0.1:8000"
        - client: [client.b, "spiffe://layer4lab/client.c"]
          action: allow
          upstream: [web-2, "[::1]:8000"]
        - client: "*"
          action: allow
          upstream: "*"
    timeouts:
      handshake: 10s
      connect: 250ms
      idle: 1m
    """
)


def minimal(**sections: Any) -> dict[str, Any]:
    """A valid raw config with ``sections`` added or replaced (a value of None drops a key)."""
    raw: dict[str, Any] = {
        "tls": {"ca": "ca.pem", "cert": "server.pem", "key": "server.key"},
        "upstreams": ["127.0.0.1:8000", "127.0.0.1:8001", "127.0.0.1:8002"],
    }
    for name, value in sections.items():
        if value is None:
            raw.pop(name, None)
        else:
            raw[name] = value
    return raw


def parse(raw: object) -> Config:
    return parse_config(raw, BASE_DIR)


def error_of(raw: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(raw)
    return info.value


def rules(*items: object) -> dict[str, Any]:
    return {"rules": list(items)}


# ------------------------------------------------------------------------- the example


def test_example_config_parses_with_exact_values() -> None:
    config = parse(yaml.safe_load(EXAMPLE_YAML))

    assert config.listen == Address("127.0.0.1", 9443)
    assert config.tls.ca == Path("/etc/layer4lab/certs/ca.pem")
    assert config.tls.cert == Path("/etc/layer4lab/certs/server.pem")
    assert config.tls.key == Path("/secrets/server.key")
    assert config.tls.identity == "san_uri"

    assert config.upstreams == (
        Upstream(Address("127.0.0.1", 8000), "127.0.0.1:8000"),
        Upstream(Address("127.0.0.1", 8001), "web-2"),
        Upstream(Address("::1", 8000), "[::1]:8000"),
    )
    assert [u.key for u in config.upstreams] == [
        "127.0.0.1:8000",
        "127.0.0.1:8001",
        "[::1]:8000",
    ]
    assert config.balancer == "round_robin"

    hc = config.health_check
    assert (hc.interval, hc.timeout, hc.rise, hc.fall) == (3.0, 0.25, 2, 3)

    rl = config.rate_limit
    assert (rl.enabled, rl.rate, rl.burst, rl.cleanup_interval, rl.max_concurrent) == (
        True,
        5.0,
        10,
        60.0,
        3,
    )
    assert isinstance(rl.rate, float)

    assert config.authorization.default == "deny"
    assert config.authorization.rules == (
        Rule(clients=("client.a",), action="deny", upstreams=("127.0.0.1:8000",)),
        Rule(
            clients=("client.b", "spiffe://layer4lab/client.c"),
            action="allow",
            upstreams=("web-2", "[::1]:8000"),
        ),
        Rule(clients=("*",), action="allow", upstreams=("*",)),
    )

    t = config.timeouts
    assert (t.handshake, t.connect, t.idle) == (10.0, 0.25, 60.0)


def test_load_config_reads_the_example_and_resolves_against_its_directory(
    tmp_path: Path,
) -> None:
    path = tmp_path / "conf" / "proxy.yaml"
    path.parent.mkdir()
    path.write_text(EXAMPLE_YAML, encoding="utf-8")

    config = load_config(path)

    assert config.tls.ca == path.parent.resolve() / "certs" / "ca.pem"
    assert config.tls.key == Path("/secrets/server.key")
    assert config.health_check.timeout == 0.25


# ---------------------------------------------------------------------------- defaults


def test_every_default_when_sections_are_absent() -> None:
    config = parse(minimal())

    assert config.listen == Address("0.0.0.0", 8443)
    assert config.tls.identity == "cn"
    assert config.balancer == "least_connections"

    hc = config.health_check
    assert (hc.interval, hc.timeout, hc.rise, hc.fall) == (3.0, 1.0, 1, 1)

    rl = config.rate_limit
    assert (rl.enabled, rl.rate, rl.burst, rl.cleanup_interval, rl.max_concurrent) == (
        True,
        2.0,
        4,
        20.0,
        0,
    )

    assert config.authorization.default == "allow"
    assert config.authorization.rules == ()

    t = config.timeouts
    assert (t.handshake, t.connect, t.idle, t.drain) == (5.0, 1.0, 300.0, 30.0)

    assert config.admin.listen == Address("127.0.0.1", 9100)
    assert config.max_connections == 0
    assert config.proxy_protocol == "none"
    assert all(u.proxy_protocol == "none" for u in config.upstreams)


def test_empty_sections_mean_defaults() -> None:
    raw = yaml.safe_load(
        textwrap.dedent(
            """\
            tls: {ca: ca.pem, cert: server.pem, key: server.key}
            upstreams: ["127.0.0.1:8000"]
            health_check:
            rate_limit: {}
            authorization:
              rules:
            timeouts:
            """
        )
    )
    config = parse(raw)
    assert config.health_check.interval == 3.0
    assert config.rate_limit.burst == 4
    assert config.authorization.rules == ()
    assert config.timeouts.idle == 300.0


def test_listen_port_zero_means_any_free_port_but_upstream_port_zero_is_an_error() -> None:
    assert parse(minimal(listen="127.0.0.1:0")).listen == Address("127.0.0.1", 0)
    assert error_of(minimal(upstreams=[{"address": "127.0.0.1:0"}])).key == "upstreams[0].address"


def test_upstream_mapping_without_name_is_named_by_its_address() -> None:
    config = parse(minimal(upstreams=[{"address": "10.0.0.1:80"}, "[::1]:8000"]))
    assert [u.name for u in config.upstreams] == ["10.0.0.1:80", "[::1]:8000"]


# ----------------------------------------------------------------------------- tls paths


def test_relative_tls_paths_resolve_against_base_dir_absolute_paths_stay() -> None:
    config = parse_config(
        minimal(tls={"ca": "pki/ca.pem", "cert": "./server.pem", "key": "/abs/server.key"}),
        Path("/srv/proxy"),
    )
    assert config.tls.ca == Path("/srv/proxy/pki/ca.pem")
    assert config.tls.cert == Path("/srv/proxy/server.pem")
    assert config.tls.key == Path("/abs/server.key")


# ------------------------------------------------------------------------ ConfigError.key

TLS = {"ca": "ca.pem", "cert": "server.pem", "key": "server.key"}
GOOD_RULE = {"client": "client.a", "action": "deny", "upstream": "127.0.0.1:8000"}

ERROR_CASES: list[tuple[str, dict[str, Any], str]] = [
    # unknown keys, at every level
    ("unknown-top", minimal(bogus=1), "bogus"),
    ("unknown-nested", minimal(health_check={"intervall": "3s"}), "health_check.intervall"),
    ("unknown-tls", minimal(tls={**TLS, "cafile": "x"}), "tls.cafile"),
    ("unknown-rate", minimal(rate_limit={"burts": 4}), "rate_limit.burts"),
    ("unknown-timeouts", minimal(timeouts={"read": "1s"}), "timeouts.read"),
    (
        "unknown-upstream-key",
        minimal(upstreams=[{"address": "127.0.0.1:8000", "weight": 2}]),
        "upstreams[0].weight",
    ),
    (
        "unknown-rule-key",
        minimal(authorization=rules(GOOD_RULE, {**GOOD_RULE, "priority": 1})),
        "authorization.rules[1].priority",
    ),
    # required keys
    ("missing-tls", minimal(tls=None), "tls"),
    ("missing-upstreams", minimal(upstreams=None), "upstreams"),
    ("missing-tls-ca", minimal(tls={"cert": "c", "key": "k"}), "tls.ca"),
    ("missing-tls-key", minimal(tls={"ca": "a", "cert": "c"}), "tls.key"),
    ("empty-upstreams", minimal(upstreams=[]), "upstreams"),
    ("upstreams-not-a-list", minimal(upstreams="127.0.0.1:8000"), "upstreams"),
    ("upstream-mapping-no-address", minimal(upstreams=[{"name": "x"}]), "upstreams[0].address"),
    (
        "missing-rule-client",
        minimal(authorization=rules({"action": "deny", "upstream": "*"})),
        "authorization.rules[0].client",
    ),
    # durations
    (
        "duration-parsecs",
        minimal(health_check={"interval": "3 parsecs"}),
        "health_check.interval",
    ),
    ("duration-negative", minimal(health_check={"interval": -1}), "health_check.interval"),
    ("duration-negative-str", minimal(health_check={"timeout": "-1s"}), "health_check.timeout"),
    ("duration-bool", minimal(health_check={"interval": True}), "health_check.interval"),
    ("duration-zero-str", minimal(health_check={"interval": "0s"}), "health_check.interval"),
    ("duration-zero-int", minimal(timeouts={"handshake": 0}), "timeouts.handshake"),
    ("duration-zero-ms", minimal(timeouts={"connect": "0ms"}), "timeouts.connect"),
    ("duration-list", minimal(timeouts={"connect": ["1s"]}), "timeouts.connect"),
    (
        "duration-cleanup-zero",
        minimal(rate_limit={"cleanup_interval": "0s"}),
        "rate_limit.cleanup_interval",
    ),
    ("duration-idle-parsecs", minimal(timeouts={"idle": "3 parsecs"}), "timeouts.idle"),
    ("duration-idle-negative", minimal(timeouts={"idle": -1}), "timeouts.idle"),
    ("duration-idle-bool", minimal(timeouts={"idle": False}), "timeouts.idle"),
    # ports and addresses
    ("listen-port-70000", minimal(listen="0.0.0.0:70000"), "listen"),
    ("listen-port-x", minimal(listen="0.0.0.0:x"), "listen"),
    ("listen-no-port", minimal(listen="localhost"), "listen"),
    ("listen-int", minimal(listen=8443), "listen"),
    ("listen-bare-ipv6", minimal(listen="::1:8443"), "listen"),
    ("upstream-port-0", minimal(upstreams=["127.0.0.1:0"]), "upstreams[0]"),
    ("upstream-port-70000", minimal(upstreams=["a:1", "127.0.0.1:70000"]), "upstreams[1]"),
    ("upstream-port-x", minimal(upstreams=["127.0.0.1:x"]), "upstreams[0]"),
    (
        "upstream-mapping-bad-port",
        minimal(upstreams=[{"address": "127.0.0.1:70000", "name": "big"}]),
        "upstreams[0].address",
    ),
    ("upstream-bad-ipv6", minimal(upstreams=["[nope]:80"]), "upstreams[0]"),
    # duplicates
    (
        "duplicate-address",
        minimal(upstreams=["127.0.0.1:8000", "127.0.0.1:8001", "127.0.0.1:8000"]),
        "upstreams[2]",
    ),
    (
        "duplicate-address-spelling",
        minimal(upstreams=["127.0.0.1:8000", "127.0.0.1:08000"]),
        "upstreams[1]",
    ),
    (
        "duplicate-address-mapping",
        minimal(upstreams=["127.0.0.1:8000", {"address": "127.0.0.1:8000", "name": "web"}]),
        "upstreams[1]",
    ),
    (
        "duplicate-name",
        minimal(
            upstreams=[
                {"address": "127.0.0.1:8000", "name": "web"},
                {"address": "127.0.0.1:8001", "name": "web"},
            ]
        ),
        "upstreams[1]",
    ),
    (
        "bad-upstream-name",
        minimal(upstreams=[{"address": "127.0.0.1:8000", "name": "has space"}]),
        "upstreams[0].name",
    ),
    # authorization
    (
        "rule-unknown-upstream",
        minimal(authorization=rules(GOOD_RULE, {**GOOD_RULE, "upstream": "127.0.0.1:9999"})),
        "authorization.rules[1].upstream",
    ),
    (
        "rule-unknown-upstream-name",
        minimal(authorization=rules(GOOD_RULE, {**GOOD_RULE, "upstream": "nope"})),
        "authorization.rules[1].upstream",
    ),
    (
        "rule-unknown-upstream-in-list",
        minimal(
            authorization=rules(
                GOOD_RULE, {**GOOD_RULE, "upstream": ["127.0.0.1:8000", "127.0.0.1:9999"]}
            )
        ),
        "authorization.rules[1].upstream",
    ),
    (
        "rule-empty-upstream-list",
        minimal(authorization=rules({**GOOD_RULE, "upstream": []})),
        "authorization.rules[0].upstream",
    ),
    (
        "rule-empty-client-list",
        minimal(authorization=rules({**GOOD_RULE, "client": []})),
        "authorization.rules[0].client",
    ),
    (
        "rule-bad-action",
        minimal(authorization=rules({**GOOD_RULE, "action": "reject"})),
        "authorization.rules[0].action",
    ),
    ("bad-default", minimal(authorization={"default": "maybe"}), "authorization.default"),
    ("rules-not-list", minimal(authorization={"rules": {"a": 1}}), "authorization.rules"),
    ("rule-not-mapping", minimal(authorization=rules(GOOD_RULE, "x")), "authorization.rules[1]"),
    (
        "rule-client-not-ascii",
        minimal(authorization=rules(GOOD_RULE, {**GOOD_RULE, "client": "\u0441lient.a"})),
        "authorization.rules[1].client",
    ),
    (
        "rule-client-in-a-list-with-a-space",
        minimal(authorization=rules({**GOOD_RULE, "client": ["client.b", "client.a "]})),
        "authorization.rules[0].client",
    ),
    (
        "rule-client-spelled-two-ways",
        minimal(authorization=rules(GOOD_RULE, {**GOOD_RULE, "client": "Client.A"})),
        "authorization.rules[1].client",
    ),
    # choices
    ("bad-balancer", minimal(balancer="random"), "balancer"),
    ("bad-identity", minimal(tls={**TLS, "identity": "email"}), "tls.identity"),
    (
        "bad-identity-charset",
        minimal(tls={**TLS, "identity_charset": "utf8"}),
        "tls.identity_charset",
    ),
    (
        "identity-charset-not-a-string",
        minimal(tls={**TLS, "identity_charset": True}),
        "tls.identity_charset",
    ),
    # numbers
    ("rate-zero", minimal(rate_limit={"rate": 0}), "rate_limit.rate"),
    ("rate-negative", minimal(rate_limit={"rate": -1.5}), "rate_limit.rate"),
    ("rate-string", minimal(rate_limit={"rate": "fast"}), "rate_limit.rate"),
    ("rate-bool", minimal(rate_limit={"rate": True}), "rate_limit.rate"),
    ("burst-zero", minimal(rate_limit={"burst": 0}), "rate_limit.burst"),
    ("burst-float", minimal(rate_limit={"burst": 2.5}), "rate_limit.burst"),
    ("burst-bool", minimal(rate_limit={"burst": True}), "rate_limit.burst"),
    (
        "max-concurrent-negative",
        minimal(rate_limit={"max_concurrent": -1}),
        "rate_limit.max_concurrent",
    ),
    (
        "max-concurrent-bool",
        minimal(rate_limit={"max_concurrent": False}),
        "rate_limit.max_concurrent",
    ),
    ("enabled-string", minimal(rate_limit={"enabled": "sometimes"}), "rate_limit.enabled"),
    ("rise-zero", minimal(health_check={"rise": 0}), "health_check.rise"),
    ("fall-zero", minimal(health_check={"fall": 0}), "health_check.fall"),
    ("rise-bool", minimal(health_check={"rise": True}), "health_check.rise"),
    ("fall-string", minimal(health_check={"fall": "3"}), "health_check.fall"),
    # shapes
    ("section-not-mapping", minimal(health_check=["3s"]), "health_check"),
    # operating
    ("admin-bad-address", minimal(admin={"listen": "9100"}), "admin.listen"),
    ("admin-unknown-key", minimal(admin={"port": 9100}), "admin.port"),
    (
        "admin-same-as-listen",
        minimal(listen="0.0.0.0:9100", admin={"listen": "0.0.0.0:9100"}),
        "admin.listen",
    ),
    ("metrics-bad-address", minimal(admin={"metrics_listen": "9101"}), "admin.metrics_listen"),
    ("tickets-negative", minimal(tls={**TLS, "session_tickets": -1}), "tls.session_tickets"),
    ("tickets-too-many", minimal(tls={**TLS, "session_tickets": 9}), "tls.session_tickets"),
    ("tickets-bool", minimal(tls={**TLS, "session_tickets": True}), "tls.session_tickets"),
    ("tickets-string", minimal(tls={**TLS, "session_tickets": "1"}), "tls.session_tickets"),
    (
        "metrics-same-as-admin",
        minimal(admin={"listen": "127.0.0.1:9100", "metrics_listen": "127.0.0.1:9100"}),
        "admin.metrics_listen",
    ),
    (
        "metrics-same-as-listen",
        minimal(listen="0.0.0.0:9100", admin={"metrics_listen": "0.0.0.0:9100"}),
        "admin.metrics_listen",
    ),
    ("drain-negative", minimal(timeouts={"drain": -1}), "timeouts.drain"),
    ("drain-words", minimal(timeouts={"drain": "a while"}), "timeouts.drain"),
    ("max-connections-negative", minimal(max_connections=-1), "max_connections"),
    ("max-connections-float", minimal(max_connections=1.5), "max_connections"),
    ("proxy-protocol-v1", minimal(proxy_protocol="v1"), "proxy_protocol"),
    (
        "upstream-proxy-protocol",
        minimal(upstreams=[{"address": "127.0.0.1:8000", "proxy_protocol": True}]),
        "upstreams[0].proxy_protocol",
    ),
]


@pytest.mark.parametrize(
    ("raw", "key"), [(raw, key) for _, raw, key in ERROR_CASES], ids=[i for i, _, _ in ERROR_CASES]
)
def test_config_error_names_the_key(raw: dict[str, Any], key: str) -> None:
    error = error_of(raw)
    assert error.key == key
    assert str(error).startswith(f"{key}: ")


@pytest.mark.parametrize("raw", [None, [], "listen: 1", 3])
def test_document_that_is_not_a_mapping_is_a_config_error(raw: object) -> None:
    assert error_of(raw).key == ""


# -------------------------------------------------------------------- accepted variants


@pytest.mark.parametrize(("idle", "expected"), [(0, 0.0), ("0s", 0.0), ("0ms", 0.0), (7, 7.0)])
def test_idle_timeout_zero_is_allowed(idle: object, expected: float) -> None:
    assert parse(minimal(timeouts={"idle": idle})).timeouts.idle == expected


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("3s", 3.0),
        ("250ms", 0.25),
        ("1m", 60.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        (".5s", 0.5),
        (" 2 s ", 2.0),
        ("10", 10.0),
        (4, 4.0),
        (0.75, 0.75),
    ],
)
def test_parse_duration_values(text: object, seconds: float) -> None:
    assert parse_duration(text, "k") == seconds


def test_parse_duration_error_carries_the_key_given() -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration("soon", "some.key")
    assert info.value.key == "some.key"


def test_rules_accept_lists_and_star() -> None:
    config = parse(
        minimal(
            authorization=rules(
                {
                    "client": ["client.a", "client-b"],
                    "action": "deny",
                    "upstream": ["127.0.0.1:8000", "127.0.0.1:8002"],
                },
                {"client": "*", "action": "allow", "upstream": "*"},
                {"client": "client.c", "action": "deny", "upstream": ["*"]},
            )
        )
    )
    assert config.authorization.rules == (
        Rule(("client.a", "client-b"), "deny", ("127.0.0.1:8000", "127.0.0.1:8002")),
        Rule(("*",), "allow", ("*",)),
        Rule(("client.c",), "deny", ("*",)),
    )


# ------------------------------------------------------------------ identity normalization


def test_identity_charset_defaults_to_ascii_and_accepts_unicode() -> None:
    assert parse(minimal()).tls.identity_charset == "ascii"
    unicode = parse(minimal(tls={**TLS, "identity_charset": "unicode"}))
    assert unicode.tls.identity_charset == "unicode"


def test_rule_clients_are_normalized_like_certificate_identities() -> None:
    config = parse(
        minimal(
            authorization=rules(
                {"client": ["Client.A", "*"], "action": "deny", "upstream": "127.0.0.1:8000"},
                {"client": "SPIFFE://LAYER4LAB/B", "action": "deny", "upstream": "*"},
                {"client": "client.c", "action": "allow", "upstream": "*"},
            )
        )
    )
    assert [r.clients for r in config.authorization.rules] == [
        ("client.a", "*"),
        ("spiffe://layer4lab/b",),
        ("client.c",),
    ]


def test_the_same_spelling_in_several_rules_is_fine() -> None:
    config = parse(
        minimal(
            authorization=rules(
                {"client": "Client.A", "action": "deny", "upstream": "127.0.0.1:8000"},
                {"client": ["client.b", "Client.A"], "action": "allow", "upstream": "*"},
                {"client": ["Client.A", "Client.A"], "action": "deny", "upstream": "*"},
            )
        )
    )
    assert [r.clients for r in config.authorization.rules] == [
        ("client.a",),
        ("client.b", "client.a"),
        ("client.a", "client.a"),
    ]


def test_spellings_that_collide_after_normalization_name_both() -> None:
    error = error_of(
        minimal(
            authorization=rules(
                {"client": "Client.A", "action": "deny", "upstream": "127.0.0.1:8000"},
                {"client": "client.b", "action": "deny", "upstream": "*"},
                {"client": ["client.c", "client.a"], "action": "allow", "upstream": "*"},
            )
        )
    )
    assert error.key == "authorization.rules[2].client"
    assert "'client.a'" in error.problem
    assert "'Client.A'" in error.problem
    assert "authorization.rules[0].client" in error.problem
    assert str(error).startswith("authorization.rules[2].client: ")


def test_spellings_that_collide_within_one_rule() -> None:
    error = error_of(
        minimal(authorization=rules({**GOOD_RULE, "client": ["client.a", "CLIENT.a"]}))
    )
    assert error.key == "authorization.rules[0].client"
    assert "'CLIENT.a'" in error.problem
    assert "'client.a'" in error.problem


@pytest.mark.parametrize(
    ("client", "reason"),
    [
        ("\u0441lient.a", "identity_not_ascii: U+0441 at 0"),
        ("client.a ", "identity_has_whitespace: U+0020 at 8"),
        ("client\ta", "identity_has_whitespace: U+0009 at 6"),
        ("client\x00a", "identity_has_control: U+0000 at 6"),
        ("caf\u00e9", "identity_not_ascii: U+00E9 at 3"),
    ],
)
def test_a_rule_client_that_a_certificate_could_not_carry_is_an_error(
    client: str, reason: str
) -> None:
    error = error_of(minimal(authorization=rules(GOOD_RULE, {**GOOD_RULE, "client": client})))
    assert error.key == "authorization.rules[1].client"
    assert reason in error.problem
    assert "tls.identity_charset" in error.problem


def test_unicode_charset_accepts_and_normalizes_non_ascii_rule_clients() -> None:
    config = parse(
        minimal(
            tls={**TLS, "identity_charset": "unicode"},
            authorization=rules(
                {"client": "\u0441lient.a", "action": "deny", "upstream": "*"},
                {"client": "CAFE\u0301", "action": "deny", "upstream": "*"},
                {"client": "client.a", "action": "deny", "upstream": "*"},  # not \u0441lient.a
            ),
        )
    )
    assert [r.clients for r in config.authorization.rules] == [
        ("\u0441lient.a",),
        ("caf\u00e9",),
        ("client.a",),
    ]
    # Canonically equivalent spellings collide; whitespace is still refused.
    collide = minimal(
        tls={**TLS, "identity_charset": "unicode"},
        authorization=rules(
            {"client": "caf\u00e9", "action": "deny", "upstream": "*"},
            {"client": "cafe\u0301", "action": "deny", "upstream": "*"},
        ),
    )
    assert error_of(collide).key == "authorization.rules[1].client"
    spaced = minimal(
        tls={**TLS, "identity_charset": "unicode"},
        authorization=rules({"client": "caf\u00e9 ", "action": "deny", "upstream": "*"}),
    )
    assert "identity_has_whitespace: U+0020 at 4" in error_of(spaced).problem


NAMED = [
    "127.0.0.1:8000",
    {"address": "127.0.0.1:8001", "name": "web-2"},
    {"address": "localhost:9000", "name": "local"},
    "[::1]:8000",
]


@pytest.mark.parametrize(
    ("written", "stored"),
    [
        ("web-2", "web-2"),
        ("127.0.0.1:8001", "127.0.0.1:8001"),
        ("local", "local"),
        ("localhost:9000", "localhost:9000"),
        ("127.0.0.1:08000", "127.0.0.1:8000"),
        ("localhost:09000", "localhost:9000"),
        ("[::1]:08000", "[::1]:8000"),
    ],
)
def test_rule_names_an_upstream_by_name_or_address(written: str, stored: str) -> None:
    config = parse(
        minimal(
            upstreams=NAMED,
            authorization=rules({"client": "c", "action": "deny", "upstream": written}),
        )
    )
    assert config.authorization.rules[0].upstreams == (stored,)


def test_rule_canonicalises_a_non_canonical_ipv6_spelling_of_a_known_upstream() -> None:
    # '[0:0::1]:8000' is the same socket address as the configured '[::1]:8000'.
    config = parse(
        minimal(
            upstreams=NAMED,
            authorization=rules({"client": "c", "action": "deny", "upstream": "[0:0::1]:8000"}),
        )
    )
    assert config.authorization.rules[0].upstreams == ("[::1]:8000",)


def test_equivalent_ipv6_spellings_are_duplicate_upstreams() -> None:
    error = error_of(minimal(upstreams=["[::1]:8000", "[0:0::1]:8000"]))
    assert error.key == "upstreams[1]"


# ------------------------------------------------------------------------------- files


def test_load_config_invalid_yaml_mentions_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        'upstreams:\n  - "127.0.0.1:8000"\ntls: {ca: a, cert: b\nbalancer: round_robin\n',
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "line 4" in str(info.value)
    assert str(path) in str(info.value)


def test_load_config_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_config(tmp_path / "absent.yaml")


def _write_tls(directory: Path, *names: str) -> Config:
    for name in names:
        (directory / name).write_text("x", encoding="utf-8")
    return parse_config(minimal(), directory)


def test_check_files_names_tls_ca_when_the_ca_is_missing(tmp_path: Path) -> None:
    config = _write_tls(tmp_path, "server.pem", "server.key")
    with pytest.raises(ConfigError) as info:
        check_files(config)
    assert info.value.key == "tls.ca"
    assert str(tmp_path / "ca.pem") in str(info.value)


def test_check_files_names_tls_key_when_the_key_is_missing(tmp_path: Path) -> None:
    config = _write_tls(tmp_path, "ca.pem", "server.pem")
    with pytest.raises(ConfigError) as info:
        check_files(config)
    assert info.value.key == "tls.key"


def test_check_files_passes_when_all_exist(tmp_path: Path) -> None:
    check_files(_write_tls(tmp_path, "ca.pem", "server.pem", "server.key"))


# -------------------------------------------------------------------------- properties


@settings(max_examples=300)
@given(st.integers(min_value=0, max_value=10**7))
@example(250)
@example(9)  # '9ms' must be 0.009, the float a user gets from writing 0.009
def test_parse_duration_milliseconds_round_trip(n: int) -> None:
    assert parse_duration(f"{n}ms", "k", allow_zero=True) == n / 1000


# ------------------------------------------------------------------------ operating


@pytest.mark.parametrize("off", ["", None])
def test_an_empty_admin_listen_turns_the_admin_listener_off(off: object) -> None:
    assert parse(minimal(admin={"listen": off})).admin.listen is None


def test_admin_port_zero_picks_a_free_port() -> None:
    assert parse(minimal(admin={"listen": "127.0.0.1:0"})).admin.listen == Address("127.0.0.1", 0)


def test_one_session_ticket_by_default_and_none_on_request() -> None:
    assert parse(minimal()).tls.session_tickets == 1
    assert parse(minimal(tls={**TLS, "session_tickets": 0})).tls.session_tickets == 0
    assert parse(minimal(tls={**TLS, "session_tickets": 8})).tls.session_tickets == 8


def test_the_metrics_listener_is_off_unless_configured_and_may_name_a_host() -> None:
    assert parse(minimal()).admin.metrics_listen is None
    admin = parse(minimal(admin={"metrics_listen": "proxy-metrics:9101"})).admin
    assert admin.metrics_listen == Address("proxy-metrics", 9101)
    assert admin.listen == Address("127.0.0.1", 9100)  # the admin listener stays


def test_changing_the_metrics_listener_needs_a_restart() -> None:
    old = parse(minimal())
    new = parse(minimal(admin={"metrics_listen": "127.0.0.1:9101"}))
    with pytest.raises(ConfigError, match="needs a restart") as caught:
        restart_needed(old, new)
    assert caught.value.key == "admin.metrics_listen"


def test_drain_zero_means_close_at_once() -> None:
    assert parse(minimal(timeouts={"drain": 0})).timeouts.drain == 0.0


def test_proxy_protocol_global_default_and_per_upstream_override() -> None:
    config = parse(
        minimal(
            proxy_protocol="v2",
            upstreams=[
                "127.0.0.1:8000",
                {"address": "127.0.0.1:8001"},
                {"address": "127.0.0.1:8002", "proxy_protocol": "none"},
            ],
        )
    )
    assert config.proxy_protocol == "v2"
    assert [u.proxy_protocol for u in config.upstreams] == ["v2", "v2", "none"]
    config = parse(minimal(upstreams=[{"address": "127.0.0.1:8000", "proxy_protocol": "v2"}]))
    assert [u.proxy_protocol for u in config.upstreams] == ["v2"]


def test_read_config_returns_the_sha256_of_the_file_bytes(tmp_path: Path) -> None:
    text = "tls: {ca: ca.pem, cert: s.pem, key: s.key}\nupstreams: ['127.0.0.1:8000']\n"
    path = tmp_path / "proxy.yaml"
    path.write_text(text, encoding="utf-8")
    config, digest = read_config(path)
    assert digest == hashlib.sha256(text.encode()).hexdigest()
    assert config.upstreams[0].key == "127.0.0.1:8000"


def test_read_config_refuses_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_bytes(b"listen: \xff\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_config(path)


# ---------------------------------------------------------------- discovered upstreams

DISCOVER = {"discover": "tasks.upstream:8000", "name": "up"}


def test_discover_makes_a_group_beside_the_fixed_upstreams() -> None:
    config = parse(
        minimal(
            proxy_protocol="v2",
            upstreams=[
                "127.0.0.1:8000",
                DISCOVER,
                {"discover": "[fd00::53]:9000", "name": "v6", "proxy_protocol": "none"},
            ],
        )
    )
    assert config.upstreams == (Upstream(Address("127.0.0.1", 8000), "127.0.0.1:8000", "v2"),)
    assert config.groups == (
        Group("up", Address("tasks.upstream", 8000), "v2"),
        Group("v6", Address("fd00::53", 9000), "none"),
    )


def test_a_config_may_have_only_discovered_upstreams() -> None:
    config = parse(minimal(upstreams=[DISCOVER]))
    assert (config.upstreams, [g.name for g in config.groups]) == ((), ["up"])


@pytest.mark.parametrize(
    ("entry", "key", "problem"),
    [
        ({"discover": "tasks.upstream:8000"}, "upstreams[1].name", "is required with discover"),
        ({"discover": "tasks.upstream", "name": "up"}, "upstreams[1].discover", "host:port"),
        ({"discover": "tasks.upstream:0", "name": "up"}, "upstreams[1].discover", "port must"),
        ({"discover": "tasks.upstream:x", "name": "up"}, "upstreams[1].discover", "port must"),
        ({"discover": "fd00::1:80", "name": "up"}, "upstreams[1].discover", "IPv6"),
        ({"discover": 8000, "name": "up"}, "upstreams[1].discover", "expected an address"),
        ({"discover": "", "name": "up"}, "upstreams[1].discover", "expected an address"),
        (
            {"discover": "tasks.upstream:8000", "address": "10.0.0.1:8000", "name": "up"},
            "upstreams[1].discover",
            "not both",
        ),
        ({"discover": "t:1", "name": "has space"}, "upstreams[1].name", "use letters"),
        ({"discover": "t:1", "name": "up@x"}, "upstreams[1].name", "use letters"),
        (
            {"discover": "t:1", "name": "up", "proxy_protocol": "v1"},
            "upstreams[1].proxy_protocol",
            "one of",
        ),
        ({"discover": "t:1", "name": "up", "weight": 1}, "upstreams[1].weight", "unknown key"),
        ({"name": "up"}, "upstreams[1].address", "or discover"),
    ],
)
def test_discover_errors_name_the_key(entry: dict[str, Any], key: str, problem: str) -> None:
    error = error_of(minimal(upstreams=["127.0.0.1:8000", entry]))
    assert error.key == key
    assert problem in error.problem


@pytest.mark.parametrize(
    ("entries", "problem"),
    [
        (
            [{"address": "127.0.0.1:8000", "name": "up"}, DISCOVER],
            "'up' is already used by upstreams[0]",
        ),
        (
            [DISCOVER, {"address": "127.0.0.1:8000", "name": "up"}],
            "'up' is already used by upstreams[0]",
        ),
        (
            [DISCOVER, {**DISCOVER, "discover": "other:8000"}],
            "'up' is already used by upstreams[0]",
        ),
        (
            [DISCOVER, {**DISCOVER, "name": "up2"}],
            "'tasks.upstream:8000' is already used by upstreams[0]",
        ),
        (
            ["tasks.upstream:8000", DISCOVER],
            "'tasks.upstream:8000' is already used by upstreams[0]",
        ),
    ],
    ids=["fixed-then-group", "group-then-fixed", "two-groups", "one-name-twice", "fixed-name"],
)
def test_a_group_name_or_name_to_discover_used_twice_is_an_error(
    entries: list[Any], problem: str
) -> None:
    error = error_of(minimal(upstreams=entries))
    assert (error.key, error.problem) == ("upstreams[1]", problem)


def member_rule(target: object) -> dict[str, Any]:
    return minimal(
        upstreams=["127.0.0.1:7000", DISCOVER, {"discover": "v6.test:9000", "name": "v6"}],
        authorization=rules({"client": "c", "action": "deny", "upstream": target}),
    )


@pytest.mark.parametrize(
    ("written", "stored"),
    [
        ("up", "up"),  # the group: every member, now and later
        ("10.0.1.7:8000", "10.0.1.7:8000"),  # one member, by address (the group's port)
        ("10.0.1.7:08000", "10.0.1.7:8000"),
        ("[fd00::7]:9000", "[fd00::7]:9000"),
        ("[fd00:0::7]:9000", "[fd00::7]:9000"),
        ("up@10.0.1.7", "up@10.0.1.7"),  # one member, by name
        ("v6@[fd00:0::7]", "v6@[fd00::7]"),
        ("127.0.0.1:7000", "127.0.0.1:7000"),  # the fixed one, as before
    ],
)
def test_rules_name_a_group_or_one_of_its_members(written: str, stored: str) -> None:
    assert parse(member_rule(written)).authorization.rules[0].upstreams == (stored,)


@pytest.mark.parametrize(
    "written",
    [
        "down",  # no such group
        "10.0.1.7:8001",  # no group has that port
        "tasks.upstream:8000",  # the name looked up is not an upstream
        "other.name:8000",  # a host name is not a member's address
        "nope@10.0.1.7",  # no such group
        "up@not-an-ip",
        "up@fd00::7",  # IPv6 in brackets, as members are named
        "up@[10.0.1.7]",
    ],
)
def test_rules_naming_no_group_nor_a_possible_member_are_errors(written: str) -> None:
    error = error_of(member_rule(written))
    assert error.key == "authorization.rules[0].upstream"
    assert "a member of a discovered group" in error.problem
    assert "up" in error.problem
