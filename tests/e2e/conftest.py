"""The end-to-end tier: the lab's images under testcontainers-python (labkit.testing).

Every container, network and volume is started through testcontainers and labelled
with this run's session; Ryuk is off (it needs a registry image), and the session's
finaliser removes everything at the end. A run killed with SIGKILL leaves its objects
behind: the next run removes them before it starts, and says so in the report header.
Without a Docker engine the tier is skipped -- or fails when ``CI=true``.
"""

from __future__ import annotations

import os

import pytest

from labkit.engine import Engine
from labkit.images import ensure_compose, ensure_prometheus
from labkit.progress import Progress
from labkit.testing import Certificates, issue_certificates
from labkit.testing.session import Session, disable_reaper

# The suite turns Ryuk off itself (not the person running it): before any container.
os.environ["TESTCONTAINERS_RYUK_DISABLED"] = "true"
disable_reaper()

# Identities the tier's certgen issues from the lab CA, beyond client.a..client.e.
EXTRA_CLIENTS = ("client.x", "client.burst", "client.polite")
EXPIRED = ("client.expired",)
OTHER_CA = ("client.otherca",)


@pytest.fixture(scope="session")
def certificates(lab_images: None, lab_session: Session) -> Certificates:
    """One certgen run for the whole tier (about a second)."""
    return issue_certificates(
        ("client.a", "client.b", "client.c", "client.d", "client.e", *EXTRA_CLIENTS),
        expired=EXPIRED,
        other_ca=OTHER_CA,
        session=lab_session,
    )


@pytest.fixture(scope="session")
def compose_plugin(lab_images: None) -> None:
    """The Compose v2 plugin is there (testcontainers' DockerCompose drives it), and
    the compose lab's Prometheus image."""
    ensure_compose(Progress(quiet=True))
    engine = Engine.connect(timeout=120)
    try:
        ensure_prometheus(engine, Progress(quiet=True))
    finally:
        engine.close()
