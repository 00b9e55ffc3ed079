"""pytest fixtures for suites that use the lab's containers.

In a project's root ``conftest.py``::

    pytest_plugins = ["labkit.testing.plugin"]

Fixtures (all session-scoped):

* ``lab_session`` -- the :class:`~labkit.testing.session.Session`: Ryuk off, leftovers
  of killed sessions removed (and reported), everything of this one removed at the end.
  Without a Docker engine the tests that use it are skipped, or fail when ``CI=true``;
* ``lab_images`` -- the lab's images exist (missing ones are built, never pulled);
* ``lab_network`` and ``lab_upstream_network`` -- two
  :class:`~labkit.testing.containers.LabNetwork`: the front one (clients and the
  proxy) and the back one (the proxy and the upstreams);
* ``lab_certificates`` -- :class:`~labkit.testing.containers.Certificates` for
  client.a..client.e.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from ..certs import Certificates
from ..engine import Engine, EngineUnavailable
from ..images import ensure_images
from ..progress import Progress
from .containers import LabNetwork, issue_certificates
from .session import Session, current_session, describe_reaped


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def _report(config: pytest.Config, text: str) -> None:
    """One line on the terminal, past pytest's output capture (as ``-s`` would show it)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None:
        return
    if capture is None:
        reporter.write_line(f"labkit.testing: {text}")
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(f"labkit.testing: {text}")


@pytest.fixture(scope="session")
def lab_session(request: pytest.FixtureRequest) -> Iterator[Session]:
    try:
        Engine.connect(timeout=30).close()
    except EngineUnavailable as exc:
        if in_ci():
            pytest.fail(f"CI=true and these tests need a Docker engine: {exc}", pytrace=False)
        pytest.skip(f"no Docker engine ({exc}); set CI=true to make this a failure")
    session = current_session()
    reaped = session.begin()
    _report(request.config, f"session {session.id}: {describe_reaped(reaped)}")
    yield session
    removed = session.end()
    _report(request.config, f"session {session.id} ended: removed {len(removed)} object(s)")


@pytest.fixture(scope="session")
def lab_images(lab_session: Session) -> None:
    engine = Engine.connect(timeout=120)
    try:
        ensure_images(engine, Progress(quiet=True))
    finally:
        engine.close()


@pytest.fixture(scope="session")
def lab_network(lab_images: None, lab_session: Session) -> Iterator[LabNetwork]:
    with LabNetwork("front", session=lab_session) as network:
        yield network


@pytest.fixture(scope="session")
def lab_upstream_network(lab_images: None, lab_session: Session) -> Iterator[LabNetwork]:
    with LabNetwork("back", session=lab_session) as network:
        yield network


@pytest.fixture(scope="session")
def lab_certificates(lab_images: None, lab_session: Session) -> Certificates:
    return issue_certificates(session=lab_session)
