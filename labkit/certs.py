"""Certificate material for the lab's containers, least privilege.

certgen runs in a container of its own (uid 10001, no network) with :data:`ISSUE_SCRIPT`:
it issues what ``LAB_SPEC`` (JSON) asks for -- ``dir``, ``clients`` (issued from the
CA), ``expired`` (issued already expired), ``other_ca`` (issued by a second, unknown
CA) -- and copies every file but the CA's key to :data:`EXPORT_DIR`, which the driver
reads back (:func:`files_of_archive`). The CA key never leaves that container.

:class:`Certificates` then says what each service gets, copied into its container before
it starts (:func:`owned_tar`: owned by the services' uid, keys 0600): the proxy its pair
and the CA certificate, a client container the pairs of the identities it runs and the
CA certificate, an upstream nothing. Both drivers use this: :mod:`labkit.run` and
:mod:`labkit.testing`.
"""

from __future__ import annotations

import io
import tarfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

SERVICE_UID = 10001  # every lab image runs as this uid/gid
CERTS_DIR = "/certs"  # where each container finds its material
EXPORT_DIR = "/tmp/export"  # noqa: S108 -- inside certgen's own container, not the host

_ISSUE = r"""
import json, os
from datetime import UTC, datetime, timedelta
from pathlib import Path
import certgen

spec = json.loads(os.environ["LAB_SPEC"])
out = Path(spec["dir"])
result = certgen.generate(out, spec["clients"])
ca = certgen.load_issued(out, "ca")
past = datetime.now(UTC) - timedelta(days=1)
for name in spec["expired"]:
    certgen.write_issued(out, name, certgen.make_client(ca, name, not_after=past))
if spec["other_ca"]:
    other = Path("/tmp/other-ca")
    certgen.generate(other, spec["other_ca"])
    for name in spec["other_ca"]:
        certgen.write_issued(out, name, certgen.load_issued(other, name))
"""

_SUMMARY = r"""
files = {
    p.name: {"mode": oct(p.stat().st_mode & 0o777), "uid": p.stat().st_uid}
    for p in sorted(out.iterdir())
}
print(json.dumps({"event": "prepared", "created": result["created"], "files": files}))
"""

_EXPORT = r"""
import shutil
export = Path(spec["export"])
export.mkdir(mode=0o700)
for p in sorted(out.iterdir()):
    if p.is_file() and p.name != "ca.key":
        shutil.copy2(p, export / p.name)
"""

ISSUE_SCRIPT = _ISSUE + _SUMMARY + _EXPORT


def issue_spec(
    clients: list[str], expired: list[str] | None = None, other_ca: list[str] | None = None
) -> dict[str, object]:
    """The ``LAB_SPEC`` for :data:`ISSUE_SCRIPT`."""
    return {
        "dir": CERTS_DIR,
        "export": EXPORT_DIR,
        "clients": clients,
        "expired": expired or [],
        "other_ca": other_ca or [],
    }


def check_prepared(files: dict[str, dict[str, object]], uid: int = 10001) -> list[str]:
    """Problems with issued material: keys must be 0600 and owned by the services' uid."""
    problems: list[str] = []
    for name, info in sorted(files.items()):
        if name.endswith(".key") and info.get("mode") != "0o600":
            problems.append(f"{name} has mode {info.get('mode')}, expected 0o600")
        if info.get("uid") != uid:
            problems.append(f"{name} is owned by uid {info.get('uid')}, expected {uid}")
    return problems


def owned_tar(files: Mapping[str, tuple[bytes, int]], uid: int = SERVICE_UID) -> bytes:
    """A tar of ``{absolute path: (bytes, mode)}``, every file owned by ``uid``, for the
    engine's put-archive (extracted at ``/``)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path, (data, mode) in files.items():
            info = tarfile.TarInfo(name=path.lstrip("/"))
            info.size, info.mode, info.mtime = len(data), mode, int(time.time())
            info.uid = info.gid = uid
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def files_of_archive(archive: bytes) -> dict[str, bytes]:
    """The regular files of a tar (as the engine's get-archive returns), by base name."""
    found: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        for member in tar.getmembers():
            extracted = tar.extractfile(member) if member.isfile() else None
            if extracted is not None:
                found[Path(member.name).name] = extracted.read()
    return found


@dataclass(frozen=True)
class Certificates:
    """Issued files by name (``ca.pem``, ``server.key``, ``client.a.pem``, ...), in memory.
    ``ca.key`` is never among them."""

    files: Mapping[str, bytes]

    def __post_init__(self) -> None:
        if "ca.key" in self.files:
            raise ValueError("the CA's key must not leave certgen's container")

    def _get(self, name: str) -> bytes:
        try:
            return self.files[name]
        except KeyError:
            raise KeyError(
                f"no {name} among the issued certificates ({', '.join(sorted(self.files))})"
            ) from None

    def pair(self, stem: str) -> dict[str, tuple[bytes, int]]:
        """``<stem>.pem`` (0644) and ``<stem>.key`` (0600) under /certs."""
        return {
            f"{CERTS_DIR}/{stem}.pem": (self._get(f"{stem}.pem"), 0o644),
            f"{CERTS_DIR}/{stem}.key": (self._get(f"{stem}.key"), 0o600),
        }

    def ca(self) -> dict[str, tuple[bytes, int]]:
        return {f"{CERTS_DIR}/ca.pem": (self._get("ca.pem"), 0o644)}

    def for_proxy(self) -> dict[str, tuple[bytes, int]]:
        return {**self.ca(), **self.pair("server")}

    def for_client(self, stem: str | None) -> dict[str, tuple[bytes, int]]:
        """The CA certificate, plus the pair ``stem`` unless None (no certificate)."""
        return self.for_clients([] if stem is None else [stem])

    def for_clients(self, stems: Sequence[str]) -> dict[str, tuple[bytes, int]]:
        """The CA certificate and the pairs ``stems``: a container running several
        identities gets theirs, and no other."""
        files = self.ca()
        for stem in stems:
            files.update(self.pair(stem))
        return files
