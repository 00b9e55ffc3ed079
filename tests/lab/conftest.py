"""Fixtures of the lab driver tier: the engine with every image the lab uses (the
network-fault helper's included), and what was labelled before the tier started."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from labkit import LABEL_RUN, Engine, EngineUnavailable, Progress, ensure_images
from labkit.images import ensure_netfault
from tests.lab.helpers import in_ci


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    """The Docker engine with the lab's images (built here if missing)."""
    try:
        found = Engine.connect(timeout=60)
    except EngineUnavailable as exc:
        if in_ci():
            pytest.fail(f"CI=true and the e2e tests need a Docker engine: {exc}", pytrace=False)
        pytest.skip(f"no Docker engine ({exc}); set CI=true to make this a failure")
    ensure_images(found, Progress())
    ensure_netfault(found, Progress())
    yield found
    found.close()


@pytest.fixture(scope="session")
def labelled_before(engine: Engine) -> set[str]:
    """What other runs (a developer's `lab.py up`, say) had labelled before these tests."""
    return {item.id for item in engine.labelled(LABEL_RUN)}
