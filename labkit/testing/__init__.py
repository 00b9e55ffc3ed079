"""labkit.testing: the lab's images as testcontainers-python containers, for any pytest
suite (testcontainers-python 4.15; no registry and no Ryuk needed).

A proxy in front of two upstreams, one client::

    from labkit.testing import (
        ClientContainer, LabNetwork, ProxyContainer, UpstreamContainer,
        issue_certificates, proxy_config,
    )

    certs = issue_certificates(["client.b"])
    with LabNetwork() as net, \\
         UpstreamContainer("u1", network=net) as u1, \\
         UpstreamContainer("u2", network=net) as u2, \\
         ProxyContainer(certs, proxy_config([u1, u2]), network=net) as proxy, \\
         ClientContainer("client.b", certs, network=net).with_count(6) as client:
        attempts = client.finish()

Everything is labelled with the process's :class:`Session`; see :mod:`.session` for the
clean-up that replaces Ryuk, :mod:`.plugin` for pytest fixtures and :mod:`.compose` for
the compose lab under ``DockerCompose``.
"""

from __future__ import annotations

from ..certs import Certificates
from ..waiting import wait_until
from .compose import LabCompose, compose_lab
from .containers import (
    CertgenContainer,
    ClientContainer,
    ImageMissing,
    LabContainer,
    LabNetwork,
    ProxyContainer,
    UpstreamContainer,
    issue_certificates,
    proxy_config,
)
from .session import Session, current_session, disable_reaper

__all__ = [
    "CertgenContainer",
    "Certificates",
    "ClientContainer",
    "ImageMissing",
    "LabCompose",
    "LabContainer",
    "LabNetwork",
    "ProxyContainer",
    "Session",
    "UpstreamContainer",
    "compose_lab",
    "current_session",
    "disable_reaper",
    "issue_certificates",
    "proxy_config",
    "wait_until",
]
