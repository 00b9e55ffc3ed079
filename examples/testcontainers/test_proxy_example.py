from labkit.testing import ClientContainer, ProxyContainer, UpstreamContainer, proxy_config


def test_the_proxy_balances_over_two_upstreams(lab_network, lab_certificates):
    net, certs = lab_network, lab_certificates
    with (
        UpstreamContainer("u1", network=net).with_proxy_protocol("v2") as u1,
        UpstreamContainer("u2", network=net).with_proxy_protocol("v2") as u2,
        ProxyContainer(certs, proxy_config([u1, u2]), network=net) as proxy,
        ClientContainer("client.b", certs, network=net).with_count(6) as client,
    ):
        attempts = client.finish()  # its 6 attempts, one every 0.5-1 s
        assert [a.outcome for a in attempts] == ["ok"] * 6
        assert {a.upstream for a in attempts} == {"u1", "u2"}  # least connections
        assert u1.identities() | u2.identities() == {"client.b"}  # PROXY v2
        assert proxy.admin_status()["state"] == "serving"
