"""Ending a TCP connection now, without leaving the kernel holding it."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

_LINGER_ZERO = struct.pack("ii", 1, 0)
TCP_CLOSE = 7  # tcpi_state after a reset; a peer's FIN leaves CLOSE_WAIT (8)


def reset(transport: asyncio.WriteTransport) -> None:
    """Close with an RST and free the socket at once.

    A plain ``abort()`` closes the descriptor, but bytes the kernel still holds to send
    keep an orphaned socket alive (FIN_WAIT1 against a zero window, for minutes) when
    the peer has stopped reading; SO_LINGER 0 discards them."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    transport.abort()


def reset_not_eof(transport: asyncio.BaseTransport | None) -> bool:
    """Is this "end of stream" really a reset?

    After a peer's RST the kernel reports ECONNRESET once, to whichever call comes
    first. When that is a send (the proxy writing the other side's bytes), the next
    read returns 0, which the event loop reports as an EOF: a stream cut by a reset
    would then be passed on as a clean end. The TCP state tells them apart: a FIN
    leaves CLOSE_WAIT, a reset CLOSE; but only while we have not sent our own FIN on
    this socket (after it, a FIN back also ends in CLOSE): callers ask only then.
    (Linux's TCP_INFO; elsewhere: False.)"""
    if transport is None:
        return False
    sock = transport.get_extra_info("socket")
    if sock is None or not hasattr(socket, "TCP_INFO"):
        return False
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    except (OSError, ValueError):
        return False
    return bool(info) and info[0] == TCP_CLOSE
