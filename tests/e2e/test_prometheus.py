"""The compose lab's Prometheus config, in the image it runs in (layer4lab/prometheus):
promtool accepts the config and the rules, and the recording rules compute what the
README says from known series (lab/prometheus/rules_test.yml). The live scrape is
checked in test_compose_lab.py."""

from __future__ import annotations

import pytest

from labkit.images import PROMETHEUS_IMAGE
from labkit.testing.containers import LabContainer
from labkit.testing.session import Session
from labkit.topology import ROOT

pytestmark = pytest.mark.e2e

CONFIG_DIR = ROOT / "lab" / "prometheus"
MOUNT = "/etc/layer4lab"
CHECKS = (
    f"promtool check config {MOUNT}/prometheus.yml"
    f" && cd {MOUNT} && promtool test rules rules_test.yml"
)


class Promtool(LabContainer):
    service = "prometheus"

    def __init__(self, session: Session) -> None:
        super().__init__("promtool", image_ref=PROMETHEUS_IMAGE, session=session)
        for path in sorted(CONFIG_DIR.glob("*.yml")):
            self.with_file(f"{MOUNT}/{path.name}", path.read_bytes())
        self.with_kwargs(network_mode="none", entrypoint=["sh", "-c", CHECKS])


def test_promtool_accepts_the_config_and_the_recording_rules_compute_as_documented(
    compose_plugin: None, lab_session: Session
) -> None:
    with Promtool(lab_session) as promtool:
        code = promtool.wait_exit(60)
        output = bytes(promtool.get_wrapped_container().logs()).decode(errors="replace")
    assert code == 0, output
    assert "SUCCESS: 1 rule files found" in output
    assert "Unit Testing:  rules_test.yml\n  SUCCESS" in output
