"""The upstream's trusted-proxy decisions (pure): entries, verdicts, name refresh."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from upstream.trust import TrustedPeers, TrustError, parse_trusted, peer_address


def test_entries_are_networks_addresses_or_names() -> None:
    spec = parse_trusted(["10.0.0.0/24", "10.1.2.3", "fd00::/8", "Proxy", "proxy", " "])
    assert spec.describe() == ["10.0.0.0/24", "10.1.2.3/32", "fd00::/8", "proxy"]
    assert spec.enabled
    assert not parse_trusted([]).enabled


@pytest.mark.parametrize("bad", ["bad name!", "10.0.0.0/33", "1.2.3", "-proxy", "a" * 300])
def test_bad_entries_are_refused_with_the_entry(bad: str) -> None:
    with pytest.raises(TrustError, match="expected an address, a CIDR or a host name"):
        parse_trusted([bad])


def test_a_peer_in_a_trusted_network_is_trusted_without_a_lookup() -> None:
    peers = TrustedPeers(parse_trusted(["10.0.0.0/24", "proxy"]))
    assert peers.verdict("10.0.0.7", now=0.0) == "trusted"
    assert peers.verdict("::ffff:10.0.0.7", now=0.0) == "trusted"  # IPv4-mapped


def test_names_are_looked_up_when_a_peer_matches_nothing_at_most_once_a_second() -> None:
    peers = TrustedPeers(parse_trusted(["proxy"]), refresh_interval=1.0)
    assert peers.verdict("10.9.0.2", now=5.0) == "resolve"
    assert peers.verdict("10.9.0.2", now=5.0, may_resolve=False) == "untrusted"
    peers.update(["10.9.0.2"], now=5.0)
    assert peers.verdict("10.9.0.2", now=5.1) == "trusted"
    assert peers.verdict("10.9.0.3", now=5.5) == "untrusted"  # fresh: no new look-up
    assert peers.verdict("10.9.0.3", now=6.0) == "resolve"  # a second later: look again
    peers.update([], now=6.0)  # the name is gone
    assert peers.verdict("10.9.0.2", now=6.1) == "untrusted"


def test_without_names_nothing_is_ever_looked_up() -> None:
    peers = TrustedPeers(parse_trusted(["192.0.2.0/24"]))
    assert peers.verdict("198.51.100.1", now=0.0) == "untrusted"
    assert peers.verdict("not an address", now=0.0) == "untrusted"


@given(st.ip_addresses(v=4), st.integers(min_value=0, max_value=32))
def test_network_membership_matches_ipaddress(address: ipaddress.IPv4Address, bits: int) -> None:
    network = ipaddress.ip_network(f"{address}/{bits}", strict=False)
    peers = TrustedPeers(parse_trusted([str(network)]))
    assert peers.verdict(str(address), now=0.0) == "trusted"
    assert peer_address(str(address)) == address


def test_loopback_peers_are_trusted_unless_told_otherwise() -> None:
    assert TrustedPeers(parse_trusted(["192.0.2.1"])).verdict("127.0.0.1", 0.0) == "trusted"
    assert TrustedPeers(parse_trusted(["192.0.2.1"])).verdict("::1", 0.0) == "trusted"
    strict = TrustedPeers(parse_trusted(["192.0.2.1"], loopback=False))
    assert strict.verdict("127.0.0.1", 0.0) == "untrusted"
