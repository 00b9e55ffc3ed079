from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.harness import WORKERS, Lab, iter_lab, make_certs


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """With ``L4PROXY_TEST_WORKERS=2`` the tests that look inside the proxy's own
    connection objects (which then live in the worker processes) are skipped, and say
    why."""
    if WORKERS <= 1:
        return
    for item in items:
        marker = item.get_closest_marker("single_process")
        if marker is not None:
            item.add_marker(pytest.mark.skip(reason=f"one process: {marker.args[0]}"))


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def lab(certs: Path) -> Iterator[Lab]:
    yield from iter_lab(certs)
