"""compose.yaml as a swarm stack (labkit.stack): what each service gets, derived from the
repository's own compose.yaml so the two cannot drift, and the swarm proxy config that
must agree with it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from labkit.stack import (
    CLIENT_ID_TEMPLATE,
    NAMESPACE_LABEL,
    SECRETS_DIR,
    STACK_LABEL,
    Shape,
    StackError,
    client_command,
    client_id,
    secret_name,
    stack_file,
)
from labkit.swarm import on_user_bridges

REPO = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((REPO / "compose.yaml").read_text())
SWARM_PROXY = yaml.safe_load((REPO / "lab" / "swarm" / "proxy.yaml").read_text())


def files_for(shape: Shape) -> dict[str, str]:
    names = ["ca.pem", "server.pem", "server.key"]
    for cid in shape.client_ids():
        names += [f"{cid}.pem", f"{cid}.key"]
    return {n: f"/tmp/x/{n}" for n in names}


def build(shape: Shape | None = None) -> dict[str, Any]:
    shape = shape or Shape(upstreams=3, clients=5)
    return stack_file(
        COMPOSE, shape, name="lab", files=files_for(shape), proxy_config="/r/lab/swarm/proxy.yaml"
    )


def targets(service: dict[str, Any]) -> dict[str, int]:
    return {s["target"]: s["mode"] for s in service.get("secrets", [])}


def test_services_are_proxy_one_upstream_service_and_one_client_service() -> None:
    stack = build(Shape(upstreams=4, clients=2, image_tag="t1"))
    assert set(stack["services"]) == {"proxy", "upstream", "client"}
    assert stack["services"]["upstream"]["deploy"]["replicas"] == 4
    assert stack["services"]["client"]["deploy"]["replicas"] == 2
    for name, service in stack["services"].items():
        assert service["image"] == f"layer4lab/{name}:t1"
        # Virtual IPs need IPVS, which this kernel lacks: every service is DNS round robin.
        assert service["deploy"]["endpoint_mode"] == "dnsrr"
        assert service["labels"][STACK_LABEL] == "lab"
    assert NAMESPACE_LABEL == "com.docker.stack.namespace"


def test_networks_connect_only_what_must_talk() -> None:
    stack = build()
    services = stack["services"]
    assert services["client"]["networks"] == ["front"]
    assert services["upstream"]["networks"] == ["back"]
    assert services["proxy"]["networks"] == ["front", "back"]
    for net in stack["networks"].values():
        assert net["driver"] == "overlay"
        assert net["internal"] is True
        assert net["attachable"] is False


def test_key_material_is_least_privilege() -> None:
    stack = build(Shape(upstreams=3, clients=3))
    services = stack["services"]
    assert "secrets" not in services["upstream"]
    assert targets(services["proxy"]) == {"ca.pem": 0o444, "server.pem": 0o444, "server.key": 0o400}
    client = targets(services["client"])
    assert client == {
        "ca.pem": 0o444,
        **{f"client.{i}.pem": 0o444 for i in (1, 2, 3)},
        **{f"client.{i}.key": 0o400 for i in (1, 2, 3)},
    }
    assert "server.key" not in client
    for service in services.values():
        for secret in service.get("secrets", []):
            assert (secret["uid"], secret["gid"]) == ("10001", "10001")
    # The CA's key is never a secret of the stack.
    assert all("ca_key" not in name for name in stack["secrets"])
    assert stack["secrets"][secret_name("client.2.key")]["file"] == "/tmp/x/client.2.key"


def test_derived_from_compose_not_copied() -> None:
    stack = build()
    upstream_env = stack["services"]["upstream"]["environment"]
    compose_env = COMPOSE["services"]["upstream1"]["environment"]
    for key, value in compose_env.items():
        if key != "UPSTREAM_NAME":
            assert upstream_env[key] == str(value)
    assert upstream_env["UPSTREAM_NAME"] == "u{{.Task.Slot}}"
    proxy = stack["services"]["proxy"]
    assert proxy["command"] == COMPOSE["services"]["proxy"]["command"]
    assert proxy["stop_grace_period"] == COMPOSE["services"]["proxy"]["stop_grace_period"]
    client = stack["services"]["client"]
    assert client["environment"] == {"CLIENT_ID": CLIENT_ID_TEMPLATE}
    assert "--id" not in client["command"]
    assert client["command"][-2:] == ["--certs", SECRETS_DIR]
    assert "--interval-min" in client["command"]


def test_scenario_overrides() -> None:
    shape = Shape(
        upstreams=3,
        clients=0,
        identities=4,
        client_args=("--concurrency", "3"),
        upstream_env={"UPSTREAM_DELAY": "1s"},
    )
    stack = build(shape)
    assert stack["services"]["client"]["deploy"]["replicas"] == 0
    assert len(targets(stack["services"]["client"])) == 1 + 2 * 4
    assert stack["services"]["client"]["command"][-2:] == ["--concurrency", "3"]
    assert stack["services"]["upstream"]["environment"]["UPSTREAM_DELAY"] == "1s"


def test_the_swarm_proxy_config_agrees_with_the_stack() -> None:
    stack = build()
    proxy_targets = set(targets(stack["services"]["proxy"]))
    for key in ("ca", "cert", "key"):
        path = Path(SWARM_PROXY["tls"][key])
        assert str(path.parent) == SECRETS_DIR
        assert path.name in proxy_targets
    (group,) = SWARM_PROXY["upstreams"]
    host, _, port = group["discover"].rpartition(":")
    assert host == "upstream"
    assert "upstream" in stack["services"]
    assert int(port) == int(
        COMPOSE["services"]["upstream1"]["environment"]["UPSTREAM_LISTEN"].rpartition(":")[2]
    )
    assert stack["configs"]["proxy_config"]["file"] == "/r/lab/swarm/proxy.yaml"


def test_client_identities_follow_the_slot() -> None:
    assert client_id(3) == "client.3"
    assert CLIENT_ID_TEMPLATE.replace("{{.Task.Slot}}", "3") == client_id(3)
    assert Shape(clients=2, identities=5).client_ids() == [client_id(i) for i in range(1, 6)]
    assert Shape(clients=6, identities=2).identity_count() == 6  # never fewer than replicas


def test_client_command_drops_id_and_certs_in_both_spellings() -> None:
    command = ["--id", "client.a", "--proxy", "proxy:8443", "--certs=/certs", "--seed", "1"]
    assert client_command(command, ["--burst"]) == [
        "--proxy",
        "proxy:8443",
        "--seed",
        "1",
        "--certs",
        SECRETS_DIR,
        "--burst",
    ]
    with pytest.raises(StackError, match="--id has no value"):
        client_command(["--proxy", "p:1", "--id"])


def test_missing_material_or_services_are_clear_errors() -> None:
    shape = Shape(clients=2)
    files = files_for(shape)
    del files["client.2.key"]
    with pytest.raises(StackError, match=r"client\.2\.key"):
        stack_file(COMPOSE, shape, name="lab", files=files, proxy_config="p")
    broken = {"services": {k: v for k, v in COMPOSE["services"].items() if k != "proxy"}}
    with pytest.raises(StackError, match="no service 'proxy'"):
        stack_file(broken, shape, name="lab", files=files_for(shape), proxy_config="p")
    with pytest.raises(StackError, match="negative"):
        stack_file(COMPOSE, Shape(upstreams=-1), name="lab", files={}, proxy_config="p")


def test_containers_a_swarm_leave_would_hurt() -> None:
    """Only containers on user-defined bridge networks lose their names at a leave
    (moby/moby#45144): not those on the default bridge, on overlays or on none."""
    drivers = {
        "bridge": "bridge",
        "docker_gwbridge": "bridge",
        "host": "host",
        "none": "null",
        "l4l-x-front": "bridge",
        "lab_back": "overlay",
    }
    running = {
        "proxy": ["l4l-x-front", "bridge"],
        "plain": ["bridge"],
        "task": ["lab_back", "docker_gwbridge"],
        "lonely": ["none"],
        "gone-net": ["deleted-meanwhile"],
    }
    assert on_user_bridges(drivers, running) == ["proxy"]
    assert on_user_bridges(drivers, {}) == []
