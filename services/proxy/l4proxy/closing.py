"""Ending a TCP connection now, without leaving the kernel holding it."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

_LINGER_ZERO = struct.pack("ii", 1, 0)


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
