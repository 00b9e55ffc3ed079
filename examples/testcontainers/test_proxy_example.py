from labkit.testing import ClientContainer, ProxyContainer, UpstreamContainer, proxy_config


def upstream(name, back):
    # PROXY v2 from the proxy, and from nobody else.
    return UpstreamContainer(name, network=back).with_proxy_protocol().with_trusted_proxy("proxy")


def test_the_proxy_balances_over_two_upstreams(lab_network, lab_upstream_network, lab_certificates):
    front, back, certs = lab_network, lab_upstream_network, lab_certificates
    with upstream("u1", back) as u1, upstream("u2", back) as u2:
        config = proxy_config([u1, u2])  # lab/proxy.yaml, these two upstreams
        with (
            ProxyContainer(certs, config, network=front, upstream_network=back) as proxy,
            ClientContainer("client.b", certs, network=front).with_count(6) as client,
        ):
            attempts = client.finish()  # its 6 attempts, one every 0.5-1 s
            assert [a.outcome for a in attempts] == ["ok"] * 6
            assert {a.upstream for a in attempts} == {"u1", "u2"}  # least connections
            assert u1.identities() | u2.identities() == {"client.b"}  # PROXY v2
            assert proxy.admin_status()["state"] == "serving"
