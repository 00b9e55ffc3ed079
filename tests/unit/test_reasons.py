"""The reasons the access log gives for failed handshakes and dials."""

from __future__ import annotations

import errno
import socket
import ssl

from l4proxy.server import describe_os_error, describe_tls_error


def test_tls_reasons_say_what_openssl_said() -> None:
    verify = ssl.SSLCertVerificationError(1, "certificate verify failed")
    verify.verify_message = "certificate has expired"
    assert describe_tls_error(verify) == "certificate: certificate has expired"
    coded = ssl.SSLError(1, "[SSL: NO_SHARED_CIPHER] no shared cipher")
    coded.reason = "NO_SHARED_CIPHER"
    assert describe_tls_error(coded) == "no_shared_cipher"
    # Without a reason code the message is kept, not just the class name.
    bare = ssl.SSLError(1, "[SSL] internal error (_ssl.c:1006)")
    assert describe_tls_error(bare) == "SSLError: [SSL] internal error (_ssl.c:1006)"
    assert describe_tls_error(ssl.SSLError()) == "SSLError"


def test_os_reasons_are_short_and_stable() -> None:
    assert describe_os_error(TimeoutError()) == "timeout"
    assert (
        describe_os_error(ConnectionRefusedError(errno.ECONNREFUSED, "refused")) == "ECONNREFUSED"
    )
    gai = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert describe_os_error(gai) == "dns: Name or service not known"
