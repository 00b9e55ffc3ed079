"""Forwarding through the real proxy: byte-exactness, half-close, flow control, counters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import uvloop

from tests.support.harness import Lab
from tests.support.loadclient import one as echo_once

REPO = Path(__file__).resolve().parents[2]


def test_single_echo_roundtrip_is_byte_exact_and_logged(lab: Lab) -> None:
    lab.start_upstreams(["echo"])
    lab.start_proxy()
    payload = os.urandom(300_000)
    # Byte-exact echo that ends with close_notify (a clean end, not a truncation).
    assert uvloop.run(echo_once(lab.address, lab.certs, "client.b", payload)) is None
    (line,) = lab.logs.wait_for("access")
    assert line["decision"] == "forwarded"
    assert line["reason"] == "eof"
    assert line["client"] == "client.b"
    assert line["upstream"] == lab.upstreams[0].address
    assert line["bytes_up"] == line["bytes_down"] == len(payload)
    assert line["tls_version"] == "TLSv1.3"
    assert lab.active() == [0]
    assert lab.open_connections() == 0


def test_200_concurrent_clients_1mib_each_byte_exact_and_counters_zero(lab: Lab) -> None:
    """The issue's acceptance load: 200 clients x 1 MiB random payload over 3 upstreams.

    The clients run in their own process (tests/support/loadclient.py)."""
    lab.start_upstreams(["echo", "echo", "echo"])
    # One slow probe on a saturated 2-core machine must not empty the pool.
    lab.start_proxy(lab.config(health_check={"interval": "200ms", "timeout": "1s", "fall": 3}))
    host, port = lab.address
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.support.loadclient",
            "--proxy",
            f"{host}:{port}",
            "--certs",
            str(lab.certs),
            "--clients",
            "200",
            "--size",
            str(1 << 20),
            "--seed",
            "7",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["failed"] == 0, result["failures"]
    assert result["ok"] == 200
    lines = lab.logs.wait_for("access", count=200, timeout=30)
    assert all(r["decision"] == "forwarded" and r["reason"] == "eof" for r in lines)
    assert sum(r["bytes_up"] for r in lines) == sum(r["bytes_down"] for r in lines) == 200 << 20
    per_upstream = {u.address: 0 for u in lab.upstreams}
    for r in lines:
        per_upstream[r["upstream"]] += 1
    assert all(n >= 40 for n in per_upstream.values()), per_upstream  # load is spread
    assert lab.health() == ["up", "up", "up"]
    assert lab.active() == [0, 0, 0]
    assert lab.open_connections() == 0
