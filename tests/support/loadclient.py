"""Echo load from a separate process: N concurrent mTLS clients, each sending a random
payload, half-closing with close_notify and checking the echo byte for byte.

    python -m tests.support.loadclient --proxy 127.0.0.1:8443 --certs DIR \
        --clients 200 --size 1048576 --seed 1 [--timeout 240]

Prints one JSON object: {"ok": n, "failed": n, "failures": [...first 10...], "seconds": t}.
Running the clients in their own process keeps them from competing with the proxy
under test for one interpreter lock.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import time
from pathlib import Path

import uvloop

from .tlsclient import End, TlsClient, client_context

STEMS = ("client.a", "client.b", "client.c", "client.d", "client.e")


async def one(address: tuple[str, int], certs: Path, stem: str, payload: bytes) -> str | None:
    """None when the echo came back byte-exact and ended cleanly, else what went wrong."""
    client = await TlsClient.connect(address, client_context(certs, stem))
    try:

        async def send() -> None:
            await client.send(payload)
            await client.close_notify()

        sender = asyncio.create_task(send())
        received = await client.recv_all()
        await sender
    finally:
        await client.aclose()
    if hashlib.sha256(received).digest() != hashlib.sha256(payload).digest():
        return f"{stem}: got {len(received)} bytes, expected {len(payload)} (mismatch)"
    if client.end is not End.CLOSE_NOTIFY:
        return f"{stem}: stream ended with {client.end}, not close_notify"
    return None


async def run(args: argparse.Namespace) -> dict[str, object]:
    host, port = args.proxy.rsplit(":", 1)
    address = (host, int(port))
    rng = random.Random(args.seed)
    payloads = [rng.randbytes(args.size) for _ in range(args.clients)]
    started = time.monotonic()

    async def guarded(i: int) -> str | None:
        try:
            return await one(address, args.certs, STEMS[i % len(STEMS)], payloads[i])
        except (OSError, EOFError, TimeoutError) as exc:
            return f"client {i}: {exc!r}"

    async with asyncio.timeout(args.timeout):
        results = await asyncio.gather(*(guarded(i) for i in range(args.clients)))
    failures = [r for r in results if r is not None]
    return {
        "ok": len(results) - len(failures),
        "failed": len(failures),
        "failures": failures[:10],
        "seconds": round(time.monotonic() - started, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--proxy", required=True)
    parser.add_argument("--certs", required=True, type=Path)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--size", type=int, default=1 << 20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=240.0)
    print(json.dumps(uvloop.run(run(parser.parse_args()))))


if __name__ == "__main__":
    main()
