"""The lab's images: present, or built here exactly as ``scripts/setup`` builds them.

``layer4lab/base:latest`` comes from Debian packages (``scripts/build-base-image``);
the service images are ``docker build -f <Dockerfile> --build-arg BASE_IMAGE=<base> .``
from the repository root, the same build compose.yaml describes. Nothing is pulled.
"""

from __future__ import annotations

import os
import subprocess

from .engine import Engine
from .progress import Progress
from .topology import ROOT

DEFAULT_BASE = "layer4lab/base:latest"
DOCKERFILES: dict[str, str] = {
    "proxy": "services/proxy/Dockerfile",
    "upstream": "services/upstream/Dockerfile",
    "client": "services/client/Dockerfile",
    "certgen": "certgen/Dockerfile",
}
BASE_SCRIPT = ROOT / "scripts" / "build-base-image"
COMPOSE_SCRIPT = ROOT / "scripts" / "ensure-compose"


class ImageError(RuntimeError):
    pass


def image_tag() -> str:
    """``latest``, or another tag from ``LAYER4LAB_IMAGE_TAG`` (to try a change in
    images while another checkout's runs use the released ones)."""
    return os.environ.get("LAYER4LAB_IMAGE_TAG") or "latest"


def image(service: str) -> str:
    """``layer4lab/<service>:<image_tag()>``."""
    return f"layer4lab/{service}:{image_tag()}"


def base_image() -> str:
    return os.environ.get("BASE_IMAGE") or DEFAULT_BASE


def ensure_images(engine: Engine, progress: Progress, *, rebuild: bool = False) -> list[str]:
    """Build whatever service image is missing (all of them with ``rebuild``); return
    the images built."""
    missing = [s for s in DOCKERFILES if rebuild or not engine.image_exists(image(s))]
    if not missing:
        progress.say("images: " + ", ".join(image(s) for s in DOCKERFILES) + " present")
        return []
    base = base_image()
    if not engine.image_exists(base):
        if base != DEFAULT_BASE:
            raise ImageError(
                f"BASE_IMAGE={base} is not on this engine, and the lab never pulls; "
                "build or load it first, or unset BASE_IMAGE"
            )
        with progress.step(f"building {base} with {BASE_SCRIPT.relative_to(ROOT)}"):
            proc = subprocess.run([str(BASE_SCRIPT)], cwd=ROOT, check=False)  # noqa: S603
            if proc.returncode != 0:
                raise ImageError(f"{BASE_SCRIPT} exited {proc.returncode}")
    built: list[str] = []
    for service in missing:
        tag = image(service)
        with progress.step(f"building {tag} (BASE_IMAGE={base})"):
            engine.build_image(
                context=str(ROOT),
                dockerfile=DOCKERFILES[service],
                tag=tag,
                buildargs={"BASE_IMAGE": base},
                labels={"layer4lab.image": service},
                on_line=lambda line: progress.say(f"  {line}") if line.startswith("Step") else None,
            )
        built.append(tag)
    return built


NETFAULT_IMAGE = "layer4lab/netfault:latest"
NETFAULT_PACKAGES = "iproute2,iptables"
PROMETHEUS_IMAGE = "layer4lab/prometheus:latest"
PROMETHEUS_PACKAGES = "prometheus"


def ensure_netfault(engine: Engine, progress: Progress) -> None:
    """The network-fault helper image: the base image's packages plus Debian's iproute2
    and iptables, only for the helpers: no service image carries these tools."""
    _ensure_debian_image(engine, progress, NETFAULT_IMAGE, NETFAULT_PACKAGES)


def ensure_prometheus(engine: Engine, progress: Progress) -> None:
    """The compose lab's Prometheus: the base image plus Debian's ``prometheus``."""
    _ensure_debian_image(engine, progress, PROMETHEUS_IMAGE, PROMETHEUS_PACKAGES)


def _ensure_debian_image(engine: Engine, progress: Progress, tag: str, packages: str) -> None:
    """An image of the base image's packages plus ``packages``, built the way the base
    is (``scripts/build-base-image --tag``, what ``scripts/setup`` runs), if missing."""
    if engine.image_exists(tag):
        return
    with progress.step(f"building {tag} (base + {packages})"):
        proc = subprocess.run(  # noqa: S603
            [str(BASE_SCRIPT), "--tag", tag],
            cwd=ROOT,
            check=False,
            env={**os.environ, "BASE_EXTRA_PACKAGES": packages},
        )
        if proc.returncode != 0:
            raise ImageError(f"{BASE_SCRIPT} --tag {tag} exited {proc.returncode}")


def ensure_compose(progress: Progress) -> None:
    """Make ``docker compose`` (the v2 plugin) available: ``scripts/ensure-compose``
    installs it from Debian's package when it is missing (idempotent, about a second
    when present)."""
    with progress.step(f"{COMPOSE_SCRIPT.relative_to(ROOT)}"):
        proc = subprocess.run(  # noqa: S603
            [str(COMPOSE_SCRIPT)], cwd=ROOT, check=False, capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise ImageError(
                f"{COMPOSE_SCRIPT} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}"
            )
