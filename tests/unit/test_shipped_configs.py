"""Every configuration file the project ships passes ``--check``, so docs cannot drift."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import certgen
from l4proxy.__main__ import main

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted(
    [*REPO.glob("examples/*.yaml"), *REPO.glob("lab/*.yaml"), *REPO.glob("lab/swarm/*.yaml")]
)


def test_the_project_ships_configs() -> None:
    assert SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_config_passes_check(path: Path, tmp_path: Path) -> None:
    raw = yaml.safe_load(path.read_text())
    certgen.generate(tmp_path)
    # Same file, with the TLS paths pointed at freshly made certificates.
    raw["tls"].update(ca="ca.pem", cert="server.pem", key="server.key")
    copy = tmp_path / path.name
    copy.write_text(yaml.safe_dump(raw))
    assert main(["--config", str(copy), "--check"]) == 0
