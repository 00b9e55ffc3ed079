"""Unit tests for l4proxy.authz: ordered rules, first match wins, exact match of
normalized identities."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l4proxy.authz import Authorizer, Verdict
from l4proxy.config import (
    IDENTITY_CHARSETS,
    Action,
    Config,
    IdentityCharset,
    Rule,
    member,
    parse_config,
)
from l4proxy.discovery import Answer
from l4proxy.identity import normalize_identity
from l4proxy.router import Admission, Router

UPSTREAMS = ["127.0.0.1:8000", "127.0.0.1:8001", "127.0.0.1:8002"]


def config(
    rules: list[dict[str, Any]],
    default: Action = "allow",
    ups: Any = None,
    charset: IdentityCharset = "ascii",
) -> Config:
    return parse_config(
        {
            "tls": {"ca": "ca.pem", "cert": "s.pem", "key": "s.key", "identity_charset": charset},
            "upstreams": UPSTREAMS if ups is None else ups,
            "authorization": {"default": default, "rules": rules},
        },
        Path("/etc/layer4lab"),
    )


def authorizer(
    rules: list[dict[str, Any]],
    default: Action = "allow",
    ups: Any = None,
    charset: IdentityCharset = "ascii",
) -> Authorizer:
    c = config(rules, default, ups, charset)
    return Authorizer(c.authorization.rules, c.authorization.default, c.upstreams)


def deny(client: object, upstream: object) -> dict[str, Any]:
    return {"client": client, "action": "deny", "upstream": upstream}


def allow(client: object, upstream: object) -> dict[str, Any]:
    return {"client": client, "action": "allow", "upstream": upstream}


# ------------------------------------------------------------------- the reference table

REFERENCE = [
    deny("client.a", "127.0.0.1:8000"),
    deny("client.c", ["127.0.0.1:8000", "127.0.0.1:8001"]),
    allow("client.c", "127.0.0.1:8002"),
]


@pytest.mark.parametrize(
    ("identity", "expected"),
    [
        ("client.a", (1, 2)),
        ("client.b", (0, 1, 2)),
        ("client.c", (2,)),
        ("client.d", (0, 1, 2)),
        ("client.e", (0, 1, 2)),
        ("someone-else", (0, 1, 2)),
    ],
)
def test_reference_table(identity: str, expected: tuple[int, ...]) -> None:
    authz = authorizer(REFERENCE)
    assert authz.allowed(identity) == expected
    assert authz.allowed(identity) == expected  # and again, from the cache


def test_reference_table_verdicts_name_the_rule() -> None:
    authz = authorizer(REFERENCE)
    u1, u2, u3 = authz.upstreams
    assert authz.decide("client.a", u1) == Verdict("deny", 0)
    assert authz.decide("client.a", u2) == Verdict("allow", None)
    assert authz.decide("client.c", u1) == Verdict("deny", 1)
    assert authz.decide("client.c", u2) == Verdict("deny", 1)
    assert authz.decide("client.c", u3) == Verdict("allow", 2)
    assert not authz.decide("client.c", u1).allowed
    assert authz.decide("client.c", u3).allowed


# ----------------------------------------------------------------------- rule semantics


def test_first_match_wins() -> None:
    allow_first = authorizer([allow("client.a", "127.0.0.1:8000"), deny("client.a", "*")])
    assert allow_first.allowed("client.a") == (0,)
    assert allow_first.decide("client.a", allow_first.upstreams[0]) == Verdict("allow", 0)
    assert allow_first.decide("client.a", allow_first.upstreams[1]) == Verdict("deny", 1)

    deny_first = authorizer([deny("client.a", "*"), allow("client.a", "127.0.0.1:8000")])
    assert deny_first.allowed("client.a") == ()
    assert deny_first.decide("client.a", deny_first.upstreams[0]) == Verdict("deny", 0)


@pytest.mark.parametrize(("default", "expected"), [("allow", (0, 1, 2)), ("deny", ())])
def test_default_applies_when_no_rule_matches(default: Action, expected: tuple[int, ...]) -> None:
    authz = authorizer([deny("client.z", "*")], default=default)
    assert authz.allowed("client.a") == expected
    for upstream in authz.upstreams:
        assert authz.decide("client.a", upstream) == Verdict(default, None)


def test_default_deny_with_an_allow_rule() -> None:
    authz = authorizer([allow("client.b", ["127.0.0.1:8001"])], default="deny")
    assert authz.allowed("client.b") == (1,)
    assert authz.allowed("client.a") == ()


def test_star_client_matches_every_identity() -> None:
    authz = authorizer([allow("client.a", "*"), deny("*", "127.0.0.1:8001")])
    assert authz.allowed("client.a") == (0, 1, 2)
    assert authz.allowed("client.b") == (0, 2)
    assert authz.allowed("spiffe://layer4lab/x") == (0, 2)


def test_star_upstream_matches_every_upstream() -> None:
    authz = authorizer([deny("client.a", "*")])
    assert authz.allowed("client.a") == ()
    assert authz.allowed("client.b") == (0, 1, 2)


def test_star_in_a_client_list() -> None:
    authz = authorizer([deny(["client.a", "*"], "127.0.0.1:8002")])
    assert authz.allowed("anyone") == (0, 1)


NAMED_UPSTREAMS = [
    {"address": "127.0.0.1:8000", "name": "alpha"},
    {"address": "127.0.0.1:8001", "name": "beta"},
    "127.0.0.1:8002",
]


@pytest.mark.parametrize(
    ("target", "denied"),
    [
        ("beta", 1),
        ("127.0.0.1:8001", 1),
        ("127.0.0.1:08001", 1),
        ("alpha", 0),
        ("127.0.0.1:8002", 2),
    ],
)
def test_rule_by_upstream_name_or_address(target: str, denied: int) -> None:
    authz = authorizer([deny("client.a", target)], ups=NAMED_UPSTREAMS)
    assert authz.allowed("client.a") == tuple(i for i in range(3) if i != denied)
    assert authz.allowed("client.b") == (0, 1, 2)


def test_a_list_mixing_names_and_addresses() -> None:
    authz = authorizer([deny("client.a", ["alpha", "127.0.0.1:8002"])], ups=NAMED_UPSTREAMS)
    assert authz.allowed("client.a") == (1,)


# ----------------------------------------------------------------------- exact identities

SPECIAL = ["client-x", "client.a", "spiffe://layer4lab/client.a", "host:8443", "team/client_1"]


@pytest.mark.parametrize("identity", SPECIAL)
def test_identities_with_punctuation_match_exactly(identity: str) -> None:
    authz = authorizer([deny(identity, "*")])
    assert authz.allowed(identity) == ()


@pytest.mark.parametrize(
    ("rule_identity", "other"),
    [
        ("client", "client-x"),
        ("client-x", "client"),
        ("client-x", "client-x2"),
        ("client-x", "my-client-x"),
        ("client.a", "clientXa"),  # '.' is not a wildcard
        ("client.a", "client.ab"),
        ("spiffe://layer4lab/client", "spiffe://layer4lab/client.a"),
        ("spiffe://layer4lab/client.a", "spiffe://layer4lab/client.a/extra"),
        ("spiffe://layer4lab/client.a", "client.a"),
        ("spiffe://layer4lab/", "spiffe://layer4lab/client.a"),
        ("host:8443", "host:84430"),
        ("team/client_1", "team/client_10"),
        ("client.a", ""),
    ],
)
def test_identities_do_not_match_prefixes_or_suffixes(rule_identity: str, other: str) -> None:
    authz = authorizer([deny(rule_identity, "*")])
    assert authz.allowed(other) == (0, 1, 2)
    assert authz.allowed(rule_identity) == ()


# ------------------------------------------------------------------ normalized identities


def decisions(authz: Authorizer, spelling: str, charset: IdentityCharset) -> list[Verdict]:
    """What a certificate naming ``spelling`` gets at each upstream (normalized first,
    as the proxy does at the handshake)."""
    identity = normalize_identity(spelling, charset)
    assert isinstance(identity, str), identity
    return [authz.decide(identity, u) for u in authz.upstreams]


@pytest.mark.parametrize("charset", IDENTITY_CHARSETS)
@pytest.mark.parametrize("spelling", ["Client.A", "CLIENT.A", "client.A", "cLiEnT.a"])
def test_a_case_variant_gets_exactly_the_decisions_of_its_identity(
    spelling: str, charset: IdentityCharset
) -> None:
    authz = authorizer(REFERENCE, charset=charset)
    expected = decisions(authz, "client.a", charset)
    assert expected == [Verdict("deny", 0), Verdict("allow", None), Verdict("allow", None)]
    assert decisions(authz, spelling, charset) == expected
    identity = normalize_identity(spelling, charset)
    assert identity == "client.a"
    assert authz.allowed(identity) == (1, 2)
    # ...and the same for client.c, denied twice by rule 1 and allowed by rule 2.
    assert decisions(authz, spelling.replace("A", "C").replace("a", "c"), charset) == [
        Verdict("deny", 1),
        Verdict("deny", 1),
        Verdict("allow", 2),
    ]


def test_rules_spelled_in_another_case_decide_the_same() -> None:
    shouting = [
        deny("CLIENT.A", "127.0.0.1:8000"),
        deny("Client.C", ["127.0.0.1:8000", "127.0.0.1:8001"]),
        allow("Client.C", "127.0.0.1:8002"),  # one spelling per identity (see test_config)
    ]
    reference, other = authorizer(REFERENCE), authorizer(shouting)
    for spelling in ["client.a", "Client.A", "client.b", "client.c", "CLIENT.C", "other"]:
        assert decisions(other, spelling, "ascii") == decisions(reference, spelling, "ascii")


def test_unicode_charset_folds_case_and_canonical_form_but_not_scripts() -> None:
    authz = authorizer(
        [deny("caf\u00e9", "*"), deny("client.a", "127.0.0.1:8000")], charset="unicode"
    )
    denied_everywhere = [Verdict("deny", 0)] * 3
    for spelling in ["caf\u00e9", "CAF\u00c9", "cafe\u0301", "CAFE\u0301"]:
        assert decisions(authz, spelling, "unicode") == denied_everywhere
    # Cyrillic U+0441 for the c: another identity, which rule 1 does not name.
    assert decisions(authz, "\u0441lient.a", "unicode") == [Verdict("allow", None)] * 3


# ---------------------------------------------------------------------------- the cache

IDENTITIES = ["client.a", "client.b", "client-x", "spiffe://layer4lab/client.a", "*", "z"]
TARGETS = ["*", *UPSTREAMS]


@st.composite
def rule_lists(draw: st.DrawFn) -> list[dict[str, Any]]:
    count = draw(st.integers(0, 6))
    result = []
    for _ in range(count):
        clients = draw(st.lists(st.sampled_from(IDENTITIES), min_size=1, max_size=3))
        targets = draw(st.lists(st.sampled_from(TARGETS), min_size=1, max_size=3))
        action = draw(st.sampled_from(["allow", "deny"]))
        result.append({"client": clients, "action": action, "upstream": targets})
    return result


@settings(max_examples=150, deadline=None)
@given(
    rules=rule_lists(),
    default=st.sampled_from(["allow", "deny"]),
    asked=st.lists(st.sampled_from([*IDENTITIES, "client", "other"]), max_size=12),
    limit=st.integers(1, 4),
)
def test_allowed_cache_agrees_with_decide(
    rules: list[dict[str, Any]], default: Action, asked: list[str], limit: int
) -> None:
    authz = authorizer(rules, default)
    authz.CACHE_LIMIT = limit  # exercise eviction too
    for identity in asked:
        expected = tuple(
            i for i, u in enumerate(authz.upstreams) if authz.decide(identity, u).allowed
        )
        assert authz.allowed(identity) == expected
        assert authz.allowed(identity) == expected


@settings(max_examples=150, deadline=None)
@given(rules=rule_lists(), default=st.sampled_from(["allow", "deny"]))
def test_decide_matches_a_first_match_model(rules: list[dict[str, Any]], default: Action) -> None:
    authz = authorizer(rules, default)
    for identity in [*IDENTITIES, "other"]:
        for upstream in authz.upstreams:
            expected = Verdict(default, None)
            for number, r in enumerate(rules):
                if (identity in r["client"] or "*" in r["client"]) and (
                    upstream.key in r["upstream"] or "*" in r["upstream"]
                ):
                    expected = Verdict(r["action"], number)
                    break
            assert authz.decide(identity, upstream) == expected


def test_rules_can_be_built_directly() -> None:
    c = config([])
    authz = Authorizer([Rule(("client.a",), "deny", ("127.0.0.1:8001",))], "allow", c.upstreams)
    assert authz.allowed("client.a") == (0, 2)


# ---------------------------------------------------------------- discovered groups

GROUPED = ["127.0.0.1:7000", {"discover": "tasks.upstream:8000", "name": "up"}]


def test_a_rule_naming_a_group_holds_for_every_member_now_and_later() -> None:
    c = config(
        [deny("client.a", "up"), allow("client.b", "up"), deny("client.b", "*")],
        default="allow",
        ups=GROUPED,
    )
    group = c.groups[0]
    authz = Authorizer(c.authorization.rules, c.authorization.default, c.upstreams)
    for ip in ("10.0.1.7", "10.0.1.8", "fd00::7"):
        found = member(group, ip)
        assert authz.decide("client.a", found) == Verdict("deny", 0)
        assert authz.decide("client.b", found) == Verdict("allow", 1)
        assert authz.decide("client.c", found) == Verdict("allow", None)
    fixed = c.upstreams[0]
    assert authz.decide("client.a", fixed) == Verdict("allow", None)  # not in the group
    assert authz.decide("client.b", fixed) == Verdict("deny", 2)
    assert not authz.group_allows("client.a", "up")
    assert authz.group_allows("client.b", "up")
    assert authz.group_allows("client.c", "up")


def test_a_rule_naming_one_member_by_address_or_name_holds_for_it_alone() -> None:
    c = config(
        [deny("client.a", "10.0.1.7:8000"), deny("client.b", "up@[fd00::7]")],
        ups=GROUPED,
    )
    group = c.groups[0]
    authz = Authorizer(c.authorization.rules, c.authorization.default, c.upstreams)
    assert not authz.decide("client.a", member(group, "10.0.1.7")).allowed
    assert authz.decide("client.a", member(group, "10.0.1.8")).allowed
    assert not authz.decide("client.b", member(group, "fd00:0::7")).allowed
    assert authz.decide("client.b", member(group, "10.0.1.7")).allowed
    assert authz.group_allows("client.a", "up")  # member rules do not speak for the group


def test_the_router_applies_group_rules_to_members_as_they_come() -> None:
    c = parse_config(
        {
            "tls": {"ca": "ca.pem", "cert": "s.pem", "key": "s.key"},
            "upstreams": GROUPED,
            "rate_limit": {"enabled": False},
            "authorization": {"rules": [deny("client.a", "up")]},
        },
        Path("/etc/layer4lab"),
    )
    router = Router(c)
    assert router.authorizer.allowed("client.a") == (0,)
    router.discovered("up", Answer(("10.0.1.7", "10.0.1.8")), 1.0)
    assert router.authorizer.allowed("client.a") == (0,)
    assert router.authorizer.allowed("client.b") == (0, 1, 2)
    router.discovered("up", Answer(("10.0.1.9", "10.0.1.7", "10.0.1.8")), 2.0)
    assert router.authorizer.allowed("client.a") == (0,)
    assert router.authorizer.allowed("client.b") == (0, 1, 2, 3)
    for _ in range(4):  # client.a only ever reaches the fixed upstream
        admission = router.admit("client.a", 3.0)
        assert isinstance(admission, Admission)
        assert admission.lease.upstream.key == "127.0.0.1:7000"
        admission.release()
    member_of_up = member(c.groups[0], "10.0.1.9")
    assert not router.permits("client.a", member_of_up)
    assert router.permits("client.b", member_of_up)
