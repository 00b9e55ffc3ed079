"""The ``isolation`` scenario's probes and verdicts: the lab cannot be walked around.

From inside each client container, :data:`PROBE_SCRIPT` (stdlib Python, run with
``docker exec``) tries what an attacker holding that container would try:

* resolve every upstream's name;
* connect to every upstream address the proxy uses, and if that works send a forged
  PROXY v2 header naming another client;
* find every file that could hold a private key and read it.

From inside an upstream container (the back network), the same script sends a forged
header to another upstream, which must refuse it (``untrusted_proxy``): the defence
behind the network one. :func:`judge_client`, :func:`judge_holder` and
:func:`judge_forgery` are pure: probe results and log records in, checks out.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .certs import CERTS_DIR
from .checks import Check, check
from .logs import Attempt

PROBE_SCRIPT = r"""
import json, os, socket, struct, sys
from concurrent.futures import ThreadPoolExecutor

spec = json.loads(sys.argv[1])
out = {"resolve": {}, "connect": {}, "keys": {}, "unreadable": []}
KEY_LABEL = b"PRIVATE" + b" KEY-----"  # the end of any PEM private key's first line

def header(identity):
    sig = b"\r\n\r\n\x00\r\nQUIT\n"
    tlv = bytes([0xE0]) + struct.pack("!H", len(identity)) + identity.encode()
    body = socket.inet_aton("192.0.2.66") + socket.inet_aton("192.0.2.1")
    body += struct.pack("!HH", 40000, 8000) + tlv
    return sig + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body

def resolve(name):
    try:
        infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
        return sorted({i[4][0] for i in infos})
    except OSError:
        return None

# Look-ups of unknown names can take ~10 s on an internal network: all at once.
hosts = {a.rpartition(":")[0] for a in spec["addresses"]}
names = sorted(set(spec["names"]) | {h for h in hosts if not h.replace(".", "").isdigit()})
with ThreadPoolExecutor(max_workers=max(1, len(names))) as pool:
    found = dict(zip(names, pool.map(resolve, names)))
out["resolve"] = {name: found[name] for name in spec["names"]}

def attempt(address):
    host, _, port = address.rpartition(":")
    if host in found and not found[host]:
        return {"connected": False, "error": f"{host} does not resolve"}
    try:
        sock = socket.create_connection((host, int(port)), timeout=spec["timeout"])
    except OSError as exc:
        return {"connected": False, "error": f"{type(exc).__name__}: {exc}"}
    reply = b""
    try:
        sock.settimeout(spec["timeout"])
        forged = spec["forge"]
        sock.sendall(header(forged) + f"Hello from {forged}\n".encode())
        while chunk := sock.recv(4096):
            reply += chunk
    except OSError:
        pass
    finally:
        sock.close()
    return {"connected": True, "reply": reply.decode(errors="replace")}

addresses = spec["addresses"]
with ThreadPoolExecutor(max_workers=max(1, len(addresses))) as pool:
    out["connect"] = dict(zip(addresses, pool.map(attempt, addresses)))

if spec["keys"]:
    skip = ("/proc", "/sys", "/dev", "/run")
    for root, dirs, files in os.walk("/"):
        if root.startswith(skip):
            dirs[:] = []
            continue
        for name in files:
            lower = name.lower()
            if not (lower.endswith((".key", ".pem")) or "key" in lower or "private" in lower):
                continue
            path = os.path.join(root, name)
            try:
                if os.path.islink(path) or os.path.getsize(path) > 65536:
                    continue
                with open(path, "rb") as handle:
                    data = handle.read()
            except PermissionError:
                out["unreadable"].append(path)
                continue
            except OSError:
                continue
            if KEY_LABEL in data:
                out["keys"][path] = data.decode(errors="replace")
print(json.dumps(out))
"""


def probe_command(
    names: Sequence[str],
    addresses: Sequence[str],
    *,
    forge: str,
    keys: bool = True,
    timeout: float = 1.5,
) -> list[str]:
    """The ``docker exec`` command line of one probe."""
    spec = {
        "names": list(names),
        "addresses": list(addresses),
        "forge": forge,
        "keys": keys,
        "timeout": timeout,
    }
    return ["python3", "-c", PROBE_SCRIPT, json.dumps(spec)]


@dataclass(frozen=True, slots=True)
class Probe:
    """What one probe found, parsed from its JSON output."""

    container: str
    resolved: dict[str, list[str] | None]
    connect: dict[str, dict[str, Any]]
    keys: dict[str, str]  # path -> PEM text of every readable private key
    unreadable: list[str]

    @classmethod
    def parse(cls, container: str, output: str) -> Probe:
        """The probe's last JSON line; ValueError (with the output) if there is none."""
        for line in reversed(output.strip().splitlines()):
            if line.startswith("{"):
                data = json.loads(line)
                return cls(
                    container,
                    dict(data.get("resolve") or {}),
                    dict(data.get("connect") or {}),
                    dict(data.get("keys") or {}),
                    list(data.get("unreadable") or []),
                )
        raise ValueError(f"the probe in {container} printed no result: {output[-2000:]}")

    def resolving(self) -> dict[str, list[str]]:
        """The names that resolved, with their addresses."""
        return {name: found for name, found in self.resolved.items() if found}

    def connected(self) -> list[str]:
        return [address for address, result in self.connect.items() if result.get("connected")]


def judge_client(
    probe: Probe, own_key: str | Sequence[str] | None, upstream_names: Iterable[str]
) -> list[Check]:
    """A client container: no upstream resolves or answers, and the only private keys it
    can read are its own (``own_key``: its path, the paths of the keys of the identities
    it runs, or None for a client without one)."""
    who = probe.container
    resolved = probe.resolving()
    names = sorted(upstream_names)
    reached = probe.connected()
    failures = [f"{a}: {r.get('error')}" for a, r in sorted(probe.connect.items())]
    allowed = {own_key} if isinstance(own_key, str) else set(own_key or ())
    extra = sorted(set(probe.keys) - allowed)
    mine = (
        "the only private key it can read is its own"
        if len(allowed) <= 1
        else f"the only private keys it can read are its {len(allowed)} identities' own"
    )
    return [
        check(
            f"{who}: no upstream name resolves ({', '.join(names)})",
            not resolved,
            f"resolved: {resolved}" if resolved else "every look-up failed",
        ),
        check(
            f"{who}: no upstream address is reachable, so no forged PROXY header gets through",
            not reached,
            f"connected to {reached}: {[probe.connect[a] for a in reached]}"
            if reached
            else f"{len(failures)} connects failed",
            failures[:6],
        ),
        check(
            f"{who}: {mine}",
            not extra and allowed <= set(probe.keys),
            f"other keys readable: {extra}"
            if extra
            else f"readable: {sorted(probe.keys) or 'none'}; unreadable: "
            f"{probe.unreadable or 'none'}",
        ),
    ]


def judge_holder(probe: Probe, allowed: set[str], what: str) -> Check:
    """A container that may hold some keys (the proxy: its own); never the CA's."""
    extra = sorted(set(probe.keys) - allowed)
    ca = [p for p in probe.keys if p.endswith("ca.key")]
    return check(
        f"{probe.container}: {what}",
        not extra and not ca,
        f"readable keys: {sorted(probe.keys)}",
    )


def from_peer(records: Sequence[Mapping[str, Any]], ip: str) -> list[Mapping[str, Any]]:
    """The upstream ``connection`` records whose socket peer is ``ip``."""
    return [r for r in records if str(r.get("peer", "")).rpartition(":")[0] == ip]


def judge_forgery(
    forger_ip: str, forged: str, victim: str, records: Sequence[Mapping[str, Any]]
) -> Check:
    """The victim upstream's ``connection`` lines: the forger's connections were refused
    (``untrusted_proxy``) and the forged identity was never believed."""
    mine = from_peer(records, forger_ip)
    believed = [r for r in mine if r.get("identity") == forged]
    refused = [r for r in mine if r.get("outcome") == "untrusted_proxy"]
    return check(
        f"{victim} refuses a PROXY header from {forger_ip} (not the proxy) naming {forged}",
        bool(mine) and len(refused) == len(mine) and not believed,
        f"{len(mine)} connection(s) from {forger_ip}: outcomes "
        f"{sorted({str(r.get('outcome')) for r in mine})}; "
        f"{len(believed)} line(s) believed {forged}",
        [json.dumps(r) for r in mine[:6]],
    )


# --- the shell: probes in a run's containers, or in the compose lab's ---------------------


def forged_identity(clients: Sequence[str], prober: str) -> str:
    """The identity a prober forges: another client's (or a made-up one)."""
    others = [c for c in clients if c != prober]
    return others[0] if others else "client.forged"


Exec = Callable[[str, list[str]], tuple[int, str]]  # (container, command) -> (code, output)


@dataclass(frozen=True, slots=True)
class Holder:
    """A client container to probe: where it runs, who it is, which pair it holds (or,
    running several identities, who they are and which pairs)."""

    container: str  # what ``exec_in`` takes (a run's member name, a container id)
    identity: str
    stem: str | None  # the pair's file stem; None for a client without a certificate
    others: tuple[str, ...] = ()  # the other identities it runs (with their own pairs)

    @property
    def identities(self) -> tuple[str, ...]:
        return (self.identity, *self.others)

    @property
    def keys(self) -> list[str]:
        """The private keys it may read: its identities' (``/certs/<stem>.key``); none
        without a certificate (which a shared container's identities have in common)."""
        if self.stem is None:
            return []
        return [f"{CERTS_DIR}/{stem}.key" for stem in (self.stem, *self.others)]


def probe_clients(
    exec_in: Exec,
    clients: Mapping[str, Holder],
    names: Sequence[str],
    addresses: Sequence[str],
) -> list[Check]:
    """Probe every client container at once (``clients`` by the name checks show);
    their checks, in the clients' order."""
    ids = [i for holder in clients.values() for i in holder.identities]

    def probe(shown: str) -> list[Check]:
        holder = clients[shown]
        others = [i for i in ids if i not in holder.identities]  # forge someone else's
        command = probe_command(names, addresses, forge=forged_identity(others, ""))
        _, output = exec_in(holder.container, command)
        return judge_client(Probe.parse(shown, output), holder.keys, names)

    with ThreadPoolExecutor(max_workers=max(1, len(clients))) as pool:
        return [c for checks in pool.map(probe, list(clients)) for c in checks]


def judge_unreached(probe: Probe, what: str) -> Check:
    """A container from which ``what`` must neither resolve nor answer."""
    resolved = probe.resolving()
    reached = probe.connected()
    return check(
        f"{probe.container}: {what} neither resolves nor answers",
        not resolved and not reached,
        f"resolved {resolved}; connected to {reached}"
        if resolved or reached
        else f"{len(probe.resolved)} look-up(s) and {len(probe.connect)} connect(s) failed",
        [f"{a}: {r.get('error')}" for a, r in sorted(probe.connect.items())],
    )


def probe_unreached(
    exec_in: Exec, containers: Mapping[str, str], names: Sequence[str], addresses: Sequence[str]
) -> list[Check]:
    """From each container (shown name -> what ``exec_in`` takes), at once: ``names``
    must not resolve and ``addresses`` must not answer (e.g. the proxy's metrics
    listener, for clients and upstreams)."""
    what = ", ".join([*names, *addresses])

    def probe(shown: str) -> Check:
        command = probe_command(names, addresses, forge="", keys=False)
        _, output = exec_in(containers[shown], command)
        return judge_unreached(Probe.parse(shown, output), what)

    with ThreadPoolExecutor(max_workers=max(1, len(containers))) as pool:
        return list(pool.map(probe, list(containers)))


def probe_proxy(exec_in: Exec, container: str) -> Check:
    """The proxy holds its own key and nothing else (no CA key)."""
    _, output = exec_in(container, probe_command([], [], forge=""))
    return judge_holder(
        Probe.parse("proxy", output),
        {f"{CERTS_DIR}/server.key"},
        "the only private key it holds is its own (no CA key)",
    )


def served_as_ruled(
    attempts: Iterable[Attempt], allowed: Mapping[str, set[str]]
) -> list[str] | None:
    """After the probes, every client is still treated as its rules say: one allowed
    somewhere got a reply from an allowed upstream, one allowed nowhere was refused.
    A line per client once each has shown it (None until then)."""
    seen: list[str] = []
    grouped: dict[str, list[Attempt]] = {}
    for item in attempts:
        grouped.setdefault(item.client, []).append(item)
    for client, upstreams in sorted(allowed.items()):
        mine = grouped.get(client, [])
        if upstreams:
            replies = [a for a in mine if a.ok and a.upstream in upstreams]
            if not replies:
                return None
            seen.append(f"{client}: reply from {replies[-1].upstream}")
        else:
            if not mine or any(a.ok for a in mine):
                return None
            seen.append(f"{client}: refused ({mine[-1].outcome}), as its rules say")
    return seen
