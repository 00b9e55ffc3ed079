"""``host:port`` and ``[v6]:port``: one parser for every address a service is given."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from .errors import ConfigError

# ASCII digits only (str.isdigit() is also true of superscripts and fullwidth digits).
# Leading zeros are fine ("08000" is 8000), but at most five digits follow them, so
# int() never sees a huge text.
_PORT = re.compile(r"0*([0-9]{1,5})")
MAX_PORT = 65535


# A listener bound to a wildcard address is reached, from the same host, over loopback.
_WILDCARD_LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1"}  # noqa: S104


def reachable_host(host: str) -> str:
    """The host to connect to for a listener bound to ``host`` on this machine."""
    return _WILDCARD_LOOPBACK.get(host, host)


def format_address(host: str, port: int) -> str:
    """``host:port``, with the host in brackets when it is an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class Address:
    host: str  # a name, an IPv4 address, or an IPv6 address without brackets
    port: int

    def __str__(self) -> str:
        return format_address(self.host, self.port)


def parse_address(value: object, key: str, *, allow_port_zero: bool = False) -> Address:
    """``host:port`` or ``[v6]:port`` as an :class:`Address`; raises :class:`ConfigError`
    naming ``key``. An IPv6 host is written one way (``[0:0::1]`` is ``::1``).

    Port 0 (the kernel picks a free port) only with ``allow_port_zero``: right for an
    address to listen on, never for one to connect to.
    """
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(key, f"expected an address 'host:port', got {value!r}")
    text = value.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ConfigError(key, f"expected '[ipv6]:port', got {value!r}")
        host, port_text = text[1:end], text[end + 2 :]
        try:
            host = str(ipaddress.IPv6Address(host))  # one spelling per address
        except ValueError:
            raise ConfigError(key, f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ConfigError(key, f"expected an address 'host:port', got {value!r}")
        if ":" in host:
            raise ConfigError(key, f"write IPv6 addresses as '[{host}]:{port_text}'")
        if " " in host or not host.isprintable():  # no name or address has these
            raise ConfigError(key, f"{host!r} is not a host name or address")
    lowest = 0 if allow_port_zero else 1
    digits = _PORT.fullmatch(port_text)
    if digits is None or not lowest <= int(digits.group(1)) <= MAX_PORT:
        raise ConfigError(
            key, f"port must be a number from {lowest} to {MAX_PORT}, got {port_text!r}"
        )
    return Address(host, int(digits.group(1)))
