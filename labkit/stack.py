"""compose.yaml as a swarm stack (pure: dicts in, a dict out; no Docker).

``docker stack deploy`` reads compose files, but not every key the compose lab needs:
it refuses ``depends_on`` with conditions, ignores ``build`` and ``pull_policy``, and a
swarm has no one-shot ``certgen`` writing into per-node volumes. :func:`stack_file`
therefore derives the stack from ``compose.yaml`` itself, so the two cannot drift:
images, the upstreams' environment, the clients' command and the proxy's command and
stop grace period are taken from it, and only what a swarm does differently is changed:

- **upstreams** (``upstream1..N`` in compose) are one replicated service ``upstream``,
  each replica named ``u<slot>`` (``{{.Task.Slot}}``), discovered by the proxy through
  the service's DNS name (``discover: "upstream:8000"`` in ``lab/swarm/proxy.yaml``);
- **clients** (``client-a..e``) are one replicated service ``client``, each replica the
  identity ``client.<slot>`` (``CLIENT_ID``);
- **networks** ``front`` and ``back`` are internal overlay networks, and every service
  uses ``endpoint_mode: dnsrr`` (virtual IPs need IPVS, which this kernel lacks);
- **key material** is swarm secrets instead of volumes: the proxy gets ``ca.pem``,
  ``server.pem`` and ``server.key``; the client service ``ca.pem`` and the pairs of its
  slots (a swarm has no per-task secret, so a client replica holds its sibling slots'
  pairs too -- never the CA key or the proxy's key); upstreams get nothing. Keys are
  mounted 0400, owned by the services' uid;
- the proxy's config is a swarm config (``lab/swarm/proxy.yaml``).

Every service, network, secret and config is labelled ``layer4lab.stack=<name>``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

STACK_LABEL = "layer4lab.stack"
NAMESPACE_LABEL = "com.docker.stack.namespace"  # what docker stack deploy puts on everything
SECRETS_DIR = "/run/secrets"  # where a swarm mounts a service's secrets
PROXY_CONFIG_TARGET = "/etc/l4proxy/config.yaml"
SERVICE_UID = "10001"
UPSTREAM_PORT = 8000
PROXY_PORT = 8443


class StackError(ValueError):
    """compose.yaml lacks what the stack is derived from, or the shape is impossible."""


@dataclass(frozen=True, slots=True)
class Shape:
    """What to deploy: replica counts, and what a scenario changes in them."""

    upstreams: int = 3
    clients: int = 5  # client replicas; identities client.1..client.<identities>
    identities: int = 0  # pairs issued for the client service (0: as many as clients)
    image_tag: str = "latest"
    client_args: tuple[str, ...] = ()  # appended to compose's client command
    upstream_env: Mapping[str, str] = field(default_factory=dict)  # overrides

    def identity_count(self) -> int:
        return max(self.identities or self.clients, self.clients)

    def client_ids(self) -> list[str]:
        return [client_id(slot) for slot in range(1, self.identity_count() + 1)]


SLOT = "{{.Task.Slot}}"  # swarm's template: a replica's slot number, from 1
CLIENT_ID_TEMPLATE = f"client.{SLOT}"
UPSTREAM_NAME_TEMPLATE = f"u{SLOT}"


def client_id(slot: int) -> str:
    """The identity of client replica ``slot`` (what swarm makes of the template)."""
    return CLIENT_ID_TEMPLATE.replace(SLOT, str(slot))


def _service(compose: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    services = compose.get("services")
    if not isinstance(services, Mapping) or not isinstance(services.get(name), Mapping):
        raise StackError(f"compose.yaml has no service {name!r} to derive the stack from")
    service: Mapping[str, Any] = services[name]
    return service


def _retag(image: object, tag: str) -> str:
    if not isinstance(image, str) or not image:
        raise StackError(f"compose.yaml: an image must be a name, got {image!r}")
    repository = image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image
    return f"{repository}:{tag}"


def client_command(command: Sequence[str], extra: Sequence[str] = ()) -> list[str]:
    """compose's client command without its ``--id`` (a replica's comes from
    ``CLIENT_ID``) and with ``--certs`` pointing at the swarm's secrets, then ``extra``."""
    out: list[str] = []
    args = list(command)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("--id", "--certs"):
            if i + 1 >= len(args):
                raise StackError(f"compose.yaml: the client command's {arg} has no value")
            i += 2
            continue
        if arg.startswith(("--id=", "--certs=")):
            i += 1
            continue
        out.append(arg)
        i += 1
    return [*out, "--certs", SECRETS_DIR, *extra]


def _secret(source: str, target: str, mode: int) -> dict[str, Any]:
    return {
        "source": source,
        "target": target,
        "uid": SERVICE_UID,
        "gid": SERVICE_UID,
        "mode": mode,
    }


def secret_name(file_name: str) -> str:
    """A secret's name in the stack for an issued file (``client.3.key`` ->
    ``client_3_key``): swarm names allow letters, digits, ``-``, ``_`` and ``.``, and
    ``_`` keeps them apart from the stack's own prefix."""
    return file_name.replace(".", "_")


def _deploy(name: str, replicas: int, restart: str, labels: Mapping[str, str]) -> dict[str, Any]:
    return {
        "mode": "replicated",
        "replicas": replicas,
        "endpoint_mode": "dnsrr",
        "restart_policy": {"condition": restart},
        "labels": {**labels, "layer4lab.service": name},
    }


def stack_file(
    compose: Mapping[str, Any],
    shape: Shape,
    *,
    name: str,
    files: Mapping[str, str],
    proxy_config: str,
) -> dict[str, Any]:
    """The stack for ``docker stack deploy``. ``files`` maps each issued file name
    (``ca.pem``, ``server.key``, ``client.1.pem``, ...) to the path it was written to,
    ``proxy_config`` is the path of the proxy's config file."""
    if shape.upstreams < 0 or shape.clients < 0:
        raise StackError("replica counts must not be negative")
    needed = ["ca.pem", "server.pem", "server.key"]
    for cid in shape.client_ids():
        needed += [f"{cid}.pem", f"{cid}.key"]
    missing = [f for f in needed if f not in files]
    if missing:
        raise StackError(f"no file for the stack's secrets: {', '.join(missing)}")
    labels = {STACK_LABEL: name}
    upstream = _service(compose, "upstream1")
    proxy = _service(compose, "proxy")
    client = _service(compose, "client-a")
    upstream_env = {
        str(k): str(v)
        for k, v in (upstream.get("environment") or {}).items()
        if k != "UPSTREAM_NAME"
    }
    command = client.get("command")
    if not isinstance(command, list):
        raise StackError("compose.yaml: client-a's command must be a list")

    client_secrets = [_secret(secret_name("ca.pem"), "ca.pem", 0o444)]
    for cid in shape.client_ids():
        client_secrets.append(_secret(secret_name(f"{cid}.pem"), f"{cid}.pem", 0o444))
        client_secrets.append(_secret(secret_name(f"{cid}.key"), f"{cid}.key", 0o400))
    services: dict[str, Any] = {
        "proxy": {
            "image": _retag(proxy.get("image"), shape.image_tag),
            "command": list(proxy.get("command") or []),
            "stop_grace_period": proxy.get("stop_grace_period", "30s"),
            "networks": ["front", "back"],
            "configs": [
                {
                    "source": "proxy_config",
                    "target": PROXY_CONFIG_TARGET,
                    "uid": "0",
                    "gid": "0",
                    "mode": 0o444,
                }
            ],
            "secrets": [
                _secret(secret_name("ca.pem"), "ca.pem", 0o444),
                _secret(secret_name("server.pem"), "server.pem", 0o444),
                _secret(secret_name("server.key"), "server.key", 0o400),
            ],
            "labels": labels,
            "deploy": _deploy("proxy", 1, "any", labels),
        },
        "upstream": {
            "image": _retag(upstream.get("image"), shape.image_tag),
            "environment": {
                **upstream_env,
                "UPSTREAM_NAME": UPSTREAM_NAME_TEMPLATE,
                **{str(k): str(v) for k, v in shape.upstream_env.items()},
            },
            "networks": ["back"],
            "labels": labels,
            "deploy": _deploy("upstream", shape.upstreams, "any", labels),
        },
        "client": {
            "image": _retag(client.get("image"), shape.image_tag),
            "environment": {"CLIENT_ID": CLIENT_ID_TEMPLATE},
            "command": client_command([str(a) for a in command], shape.client_args),
            "networks": ["front"],
            "secrets": client_secrets,
            "labels": labels,
            # A client that stops by itself (--count, --duration) stays stopped.
            "deploy": _deploy("client", shape.clients, "on-failure", labels),
        },
    }
    networks = {
        net: {"driver": "overlay", "internal": True, "attachable": False, "labels": labels}
        for net in ("front", "back")
    }
    secrets = {secret_name(f): {"file": files[f], "labels": labels} for f in needed}
    return {
        "services": services,
        "networks": networks,
        "secrets": secrets,
        "configs": {"proxy_config": {"file": proxy_config, "labels": labels}},
    }
