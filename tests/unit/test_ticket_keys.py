"""Session ticket keys shared by workers (``tls.set_ticket_keys``): a ticket one
context issued resumes on another context with the same keys, and only then. TLS runs
in memory (two BIO pairs), no sockets."""

from __future__ import annotations

import contextlib
import os
import ssl
from pathlib import Path

import pytest

import certgen
from l4proxy.config import TlsConfig
from l4proxy.tls import TICKET_KEYS_SIZE, server_context, set_ticket_keys


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    certgen.generate(out, ["client.a"])
    return out


def contexts(certs: Path) -> tuple[ssl.SSLContext, ssl.SSLContext, ssl.SSLContext]:
    tls = TlsConfig(ca=certs / "ca.pem", cert=certs / "server.pem", key=certs / "server.key")
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(certs / "ca.pem")
    client.load_cert_chain(certs / "client.a.pem", certs / "client.a.key")
    return server_context(tls), server_context(tls), client


def connect(
    server: ssl.SSLContext, client: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> ssl.SSLObject:
    """A whole handshake and one byte each way (which carries the ticket); the client end."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    srv = server.wrap_bio(s_in, s_out, server_side=True)
    cli = client.wrap_bio(c_in, c_out, server_hostname="localhost", session=session)
    for _ in range(10):
        for end in (cli, srv):
            with contextlib.suppress(ssl.SSLWantReadError):
                end.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    srv.write(b"x")
    c_in.write(s_out.read())
    assert cli.read(1) == b"x"
    return cli


def test_a_ticket_resumes_on_another_context_with_the_same_keys_only(certs: Path) -> None:
    first, second, client = contexts(certs)
    keys = os.urandom(TICKET_KEYS_SIZE)
    assert set_ticket_keys(first, keys) is None
    session = connect(first, client).session
    assert session is not None
    assert session.has_ticket
    assert not connect(second, client, session).session_reused  # its own keys
    assert set_ticket_keys(second, keys) is None
    assert connect(second, client, session).session_reused


def test_keys_of_the_wrong_size_are_refused_and_say_why(certs: Path) -> None:
    context, _, _ = contexts(certs)
    assert set_ticket_keys(context, b"short") == "ticket keys must be 80 bytes, not 5"
