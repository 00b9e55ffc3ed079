"""Scripts run inside the certgen image (uid 10001, no network) through its Python API.

Both drivers of the lab use them: :mod:`labkit.run` prepares a run's volume (certificates
plus the proxy config), :mod:`labkit.testing` issues certificates inside a certgen
container and takes out only what the services need. ``LAB_SPEC`` (JSON) says what:
``dir``, ``clients`` (issued from the CA), ``expired`` (issued already expired),
``other_ca`` (issued by a second, unknown CA) and, for a run, ``config``.
"""

from __future__ import annotations

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

_CONFIG = r"""
config = out / "proxy.yaml"
config.write_text(spec["config"], encoding="utf-8")
config.chmod(0o644)
"""

_SUMMARY = r"""
files = {
    p.name: {"mode": oct(p.stat().st_mode & 0o777), "uid": p.stat().st_uid}
    for p in sorted(out.iterdir())
}
print(json.dumps({"event": "prepared", "created": result["created"], "files": files}))
"""

# Certificates only: what labkit.testing's certgen container runs.
ISSUE_SCRIPT = _ISSUE + _SUMMARY

# Certificates, then the run's proxy config: what labkit.run runs on a run's volume.
PREPARE_SCRIPT = _ISSUE + _CONFIG + _SUMMARY


def check_prepared(files: dict[str, dict[str, object]], uid: int = 10001) -> list[str]:
    """Problems with issued material: keys must be 0600 and owned by the services' uid."""
    problems: list[str] = []
    for name, info in sorted(files.items()):
        if name.endswith(".key") and info.get("mode") != "0o600":
            problems.append(f"{name} has mode {info.get('mode')}, expected 0o600")
        if info.get("uid") != uid:
            problems.append(f"{name} is owned by uid {info.get('uid')}, expected {uid}")
    return problems
