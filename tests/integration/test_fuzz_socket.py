"""Garbage at the proxy's socket, counted: real sockets on loopback, a seeded RNG, one
connection per input, then a strict account of what the proxy did with them.

Inputs (one connection each; CASES below builds them from SEED):

* RANDOM_BYTES ......... random bytes, 0 to 70,000 of them
* RANDOM_RECORDS ....... TLS records with random content types, versions and lengths:
  zero-length, truncated, oversized (past 16 KiB + 2,048), several back to back
* HELLO_CUT_CLOSED ..... a real ClientHello cut at every offset, then the connection closed
* HELLO_CUT_GARBAGE .... a ClientHello cut at a sample of offsets, then random bytes
* AFTER_SERVER_HELLO ... a valid ClientHello, the server's first flight read, then garbage
* VERIFIED_GARBAGE ..... a full handshake with client.b's certificate, then non-TLS bytes
* VALID ................ a full exchange with client.b: its bytes reach the upstream whole

The total is FIXED_CONNECTIONS (1,400) + the ClientHello's length (every offset). After the
last one, the proxy must have closed every connection (polled with a deadline), written
exactly one access line per connection with a decision from the expected set, logged no
``error``, shown 0 open connections in /status, given back every upstream slot, and closed
every upstream connection; the upstream (``record``: it keeps what each connection sent,
and closes at its end) must have received exactly the valid clients' bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import uvloop

from tests.support.harness import Lab
from tests.support.loops import wait_for
from tests.support.tlsclient import End, TlsClient, client_context

SEED = 20240611
RANDOM_BYTES = 400
RANDOM_RECORDS = 400
HELLO_CUT_GARBAGE = 300
AFTER_SERVER_HELLO = 150
VERIFIED_GARBAGE = 100
VALID = 50
# HELLO_CUT_CLOSED is the ClientHello's length (every offset), known once it is captured:
# the total is FIXED_CONNECTIONS + that length.
FIXED_CONNECTIONS = (
    RANDOM_BYTES
    + RANDOM_RECORDS
    + HELLO_CUT_GARBAGE
    + AFTER_SERVER_HELLO
    + VERIFIED_GARBAGE
    + VALID
)
CONCURRENCY = 48
HANDSHAKE_TIMEOUT = "300ms"

# What each kind of input may end as. Nothing that fails the handshake reaches an upstream.
REFUSED = {"tls_failed", "handshake_timeout"}
EXPECTED: dict[str, set[str]] = {
    "random_bytes": REFUSED,
    "random_records": REFUSED,
    "hello_cut_closed": REFUSED,
    "hello_cut_garbage": REFUSED,
    "after_server_hello": REFUSED,
    # The garbage reaches the proxy's TLS reader after the upstream was dialled.
    "verified_garbage": {"forwarded", "aborted"},
    "valid": {"forwarded"},
}


@dataclass(frozen=True)
class Case:
    kind: str
    payload: bytes  # raw bytes (garbage kinds), or what follows the handshake
    ending: str  # close | eof | wait: how the client ends (see send_raw)
    cut: int = -1  # hello_cut_*: where the ClientHello is cut


def capture_client_hello(ctx: ssl.SSLContext) -> bytes:
    """A real ClientHello, as this Python's OpenSSL writes it for ``ctx``."""
    tls = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = out.read()
    assert hello[0] == 0x16
    assert hello[5] == 0x01  # a handshake record holding a ClientHello
    return hello


def random_length(rng: random.Random) -> int:
    """0 to 70,000, log-uniform-ish: many short inputs, some past several records."""
    return rng.choice(
        [0, 1, 2, 5, 6, 16, 100, 517, 4096, 16389, 18437, 70_000, rng.randrange(70_000)]
    )


def random_records(rng: random.Random) -> bytes:
    """One to three TLS records with random type, version and length, whole or not."""
    out = bytearray()
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice([20, 21, 22, 23, 24, 0, 0x80, 0xFF, rng.randrange(256)])
        version = rng.choice(
            [0x0301, 0x0303, 0x0304, 0x0300, 0x0200, 0xFEFF, rng.randrange(1 << 16)]
        )
        declared = rng.choice(
            [
                0,
                1,
                4,
                5,
                16384,
                16384 + 256,
                16384 + 2048,
                16384 + 2049,
                0xFFFF,
                rng.randrange(1 << 16),
            ]
        )
        actual = rng.choice(
            [declared, declared, rng.randrange(declared + 1), declared + rng.randint(1, 64)]
        )
        out += bytes([kind]) + version.to_bytes(2, "big") + declared.to_bytes(2, "big")
        out += rng.randbytes(actual)
    return bytes(out)


def build_cases(hello: bytes) -> list[Case]:
    rng = random.Random(SEED)
    endings = ["close", "eof", "wait"]
    cases: list[Case] = []
    cases += [
        Case("random_bytes", rng.randbytes(random_length(rng)), rng.choice(endings))
        for _ in range(RANDOM_BYTES)
    ]
    cases += [
        Case("random_records", random_records(rng), rng.choice(endings))
        for _ in range(RANDOM_RECORDS)
    ]
    cases += [Case("hello_cut_closed", hello[:cut], "close", cut) for cut in range(len(hello))]
    for cut in sorted(rng.sample(range(len(hello)), HELLO_CUT_GARBAGE)):
        garbage = rng.randbytes(rng.choice([1, 7, 300, 5000]))
        cases.append(Case("hello_cut_garbage", hello[:cut] + garbage, rng.choice(endings), cut))
    cases += [
        Case("after_server_hello", rng.randbytes(rng.choice([1, 5, 64, 3000])), rng.choice(endings))
        for _ in range(AFTER_SERVER_HELLO)
    ]
    cases += [
        Case(
            "verified_garbage",
            rng.randbytes(rng.choice([1, 5, 64, 3000, 40_000])),
            rng.choice(["close", "eof"]),
        )
        for _ in range(VERIFIED_GARBAGE)
    ]
    cases += [
        Case("valid", rng.randbytes(rng.choice([1, 100, 20_000])), "eof") for _ in range(VALID)
    ]
    rng.shuffle(cases)
    return cases


async def finish(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ending: str) -> None:
    """End a raw connection: ``close`` at once; ``eof``: half-close, then read until the
    proxy closes; ``wait``: keep the write side open and read until the proxy closes (a
    stall: only the handshake timeout ends it)."""
    try:
        if ending == "close":
            return
        if ending == "eof" and writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(10):
            while await reader.read(65536):
                pass
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


async def send_raw(address: tuple[str, int], payload: bytes, ending: str) -> int:
    """Connect, send ``payload``, end as ``ending``. Returns the client's port."""
    reader, writer = await asyncio.open_connection(*address)
    port = int(writer.get_extra_info("sockname")[1])
    with contextlib.suppress(ConnectionError, OSError):
        writer.write(payload)
        await writer.drain()
    await finish(reader, writer, ending)
    return port


async def after_server_hello(
    address: tuple[str, int], ctx: ssl.SSLContext, garbage: bytes, ending: str
) -> int:
    """A valid ClientHello; once the server's first flight has arrived, garbage."""
    reader, writer = await asyncio.open_connection(*address)
    port = int(writer.get_extra_info("sockname")[1])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    try:
        writer.write(outgoing.read())
        async with asyncio.timeout(10):
            flight = await reader.read(65536)
        assert flight[:1] == b"\x16", flight[:16]  # the ServerHello's handshake record
        writer.write(garbage)
        await writer.drain()
    except (ConnectionError, OSError):
        pass
    await finish(reader, writer, ending)
    return port


async def verified_then(
    address: tuple[str, int], ctx: ssl.SSLContext, case: Case
) -> tuple[int, End | None]:
    """A full handshake with a client certificate; then either garbage on the raw socket
    (``verified_garbage``) or an upload through the proxy (``valid``: send, close_notify,
    read to the end; returns how the stream ended)."""
    client = await TlsClient.connect(address, ctx)
    port = int(client.writer.get_extra_info("sockname")[1])
    if case.kind == "valid":
        await client.send(case.payload)
        await client.close_notify()
        assert await client.recv_all() == b""
        await client.aclose()
        return port, client.end
    try:
        client.writer.write(case.payload)  # not a TLS record: straight onto the socket
        await client.writer.drain()
    except (ConnectionError, OSError):
        pass
    await finish(client.reader, client.writer, case.ending)
    return port, None


def test_garbage_at_the_socket_is_refused_and_accounted_for(lab: Lab) -> None:
    """FIXED_CONNECTIONS (1,400) + the ClientHello's length connections, CONCURRENCY (48)
    at a time, from SEED: every one gets
    exactly one access line with an expected decision, garbage never reaches an upstream,
    valid clients are served throughout, and nothing is left open or leased."""
    (upstream,) = lab.start_upstreams(["record"])
    lab.start_proxy(lab.config(timeouts={"handshake": HANDSHAKE_TIMEOUT}))
    address = lab.address
    ctx = client_context(lab.certs, "client.b")
    hello = capture_client_hello(client_context(lab.certs, "client.b"))
    cases = build_cases(hello)
    assert len(cases) == FIXED_CONNECTIONS + len(hello)

    by_port: dict[int, list[Case]] = {}
    ends: list[End | None] = []

    async def one(case: Case, gate: asyncio.Semaphore) -> None:
        async with gate:
            if case.kind in ("verified_garbage", "valid"):
                port, end = await verified_then(address, ctx, case)
                if case.kind == "valid":
                    ends.append(end)
            elif case.kind == "after_server_hello":
                port = await after_server_hello(address, ctx, case.payload, case.ending)
            else:
                port = await send_raw(address, case.payload, case.ending)
            by_port.setdefault(port, []).append(case)

    async def main() -> None:
        gate = asyncio.Semaphore(CONCURRENCY)
        async with asyncio.timeout(60):
            await asyncio.gather(*(one(case, gate) for case in cases))

    started = time.monotonic()
    uvloop.run(main())
    wait_for("the proxy to close every connection", lambda: lab.open_connections() == 0, 15)
    lines = lab.logs.wait_for("access", count=len(cases), timeout=15)
    elapsed = time.monotonic() - started

    # Exactly one access line per connection made, matched to its input by the client's
    # port (the kernel may hand a port out again: such a port has as many lines as inputs,
    # each with a decision one of them allows).
    assert len(lines) == len(cases)
    lines_by_port: dict[int, list[dict[str, Any]]] = {}
    for line in lines:
        lines_by_port.setdefault(int(str(line["peer"]).rpartition(":")[2]), []).append(line)
    assert set(lines_by_port) == set(by_port)
    decisions: Counter[tuple[str, str]] = Counter()
    wrong: list[tuple[str, dict[str, Any]]] = []
    for port, port_lines in lines_by_port.items():
        kinds = sorted({case.kind for case in by_port[port]})
        assert len(port_lines) == len(by_port[port]), (port, kinds, port_lines)
        allowed = set().union(*(EXPECTED[kind] for kind in kinds))
        for line in port_lines:
            decisions["/".join(kinds), str(line["decision"])] += 1
            if line["decision"] not in allowed or not line["reason"]:
                wrong.append(("/".join(kinds), line))
            if line["decision"] in REFUSED:
                assert line["upstream"] is None, line  # garbage never reaches an upstream
                assert line["client"] is None, line
    assert not wrong, wrong[:10]

    # Valid clients were served the whole time: each upload reached the upstream whole
    # (and ended cleanly), and nothing else did, not a byte of garbage.
    assert ends == [End.CLOSE_NOTIFY] * VALID

    def received() -> list[bytes]:
        return sorted(data for data in upstream.stats.received if data)

    uploads = sorted(case.payload for case in cases if case.kind == "valid")
    wait_for("every upload at the upstream", lambda: lab.up_loop.call(received) == uploads, 10)

    # Nothing left: no error logged, nothing open, no upstream slot leased.
    assert lab.logs.events("error") == []
    status, body = lab.admin_json("/status")
    assert status == 200
    assert body["connections"]["open"] == 0
    assert lab.active() == [0]
    # Every upstream connection ended (health probes come and go every 100 ms).
    wait_for(
        "no open upstream connection", lambda: lab.up_loop.call(lambda: upstream.stats.open) == 0
    )
    print(
        f"\n{len(cases)} connections in {elapsed:.1f}s; ClientHello {len(hello)} bytes; "
        + ", ".join(f"{k} {d}: {n}" for (k, d), n in sorted(decisions.items()))
    )
