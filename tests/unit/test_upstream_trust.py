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
    assert peers.verdict("10.0.0.7", arrived=0.0) == "trusted"
    assert peers.verdict("::ffff:10.0.0.7", arrived=0.0) == "trusted"  # IPv4-mapped


def test_a_peer_is_judged_only_by_a_lookup_that_started_after_it_connected() -> None:
    peers = TrustedPeers(parse_trusted(["proxy"]), refresh_interval=1.0)
    assert peers.verdict("10.9.0.2", arrived=5.0) == "resolve"
    assert peers.lookup_delay(5.0) == 0.0  # never looked up: at once
    peers.update({"proxy": []}, started=5.0)  # the proxy's name is not there yet
    assert peers.verdict("10.9.0.2", arrived=5.0) == "untrusted"  # judged: refused
    # A peer that came after that look-up started is not refused by its answer: it
    # waits for the next one, which may start a second after the last.
    assert peers.verdict("10.9.0.2", arrived=5.2) == "resolve"
    assert peers.lookup_delay(5.2) == pytest.approx(0.8)
    assert peers.update({"proxy": ["10.9.0.2"]}, started=6.0)
    assert peers.verdict("10.9.0.2", arrived=5.2) == "trusted"
    assert peers.verdict("10.9.0.2", arrived=60.0) == "trusted"  # no look-up needed
    assert peers.verdict("10.9.0.3", arrived=5.9) == "untrusted"
    assert peers.update({"proxy": []}, started=7.0)  # the name is gone
    assert peers.verdict("10.9.0.2", arrived=6.5) == "untrusted"


def test_a_failed_lookup_keeps_the_names_last_answer() -> None:
    peers = TrustedPeers(parse_trusted(["proxy", "backup"]))
    peers.update({"proxy": ["10.9.0.2"], "backup": ["10.9.0.9"]}, started=1.0)
    changed = peers.update({"proxy": None, "backup": []}, started=2.0)  # timeout, gone
    assert changed
    assert peers.verdict("10.9.0.2", arrived=1.5) == "trusted"
    assert peers.verdict("10.9.0.9", arrived=1.5) == "untrusted"
    assert not peers.update({"proxy": None, "backup": None}, started=3.0)
    assert peers.resolved_at == 3.0


def test_without_names_nothing_is_ever_looked_up() -> None:
    peers = TrustedPeers(parse_trusted(["192.0.2.0/24"]))
    assert peers.verdict("198.51.100.1", arrived=0.0) == "untrusted"
    assert peers.verdict("not an address", arrived=0.0) == "untrusted"


@given(st.ip_addresses(v=4), st.integers(min_value=0, max_value=32))
def test_network_membership_matches_ipaddress(address: ipaddress.IPv4Address, bits: int) -> None:
    network = ipaddress.ip_network(f"{address}/{bits}", strict=False)
    peers = TrustedPeers(parse_trusted([str(network)]))
    assert peers.verdict(str(address), arrived=0.0) == "trusted"
    assert peer_address(str(address)) == address


def test_loopback_peers_are_trusted_unless_told_otherwise() -> None:
    assert TrustedPeers(parse_trusted(["192.0.2.1"])).verdict("127.0.0.1", 0.0) == "trusted"
    assert TrustedPeers(parse_trusted(["192.0.2.1"])).verdict("::1", 0.0) == "trusted"
    strict = TrustedPeers(parse_trusted(["192.0.2.1"], loopback=False))
    assert strict.verdict("127.0.0.1", 0.0) == "untrusted"
