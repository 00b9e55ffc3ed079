"""labkit.testing's pure parts: which sessions are stale, project names, the tar that
gives files to the services' uid, which files each service gets, compose log parsing,
and the README's example being the file the e2e tier runs."""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from labkit.certs import Certificates, owned_tar
from labkit.engine import Labelled
from labkit.testing.compose import json_lines
from labkit.testing.session import (
    LABEL_HOST,
    LABEL_PID,
    LABEL_SESSION,
    PROJECT_PREFIX,
    Session,
    describe_reaped,
    session_of_project,
    stale_sessions,
)

ROOT = Path(__file__).resolve().parents[2]


def item(session: str, host: str = "h1", pid: int = 100, kind: str = "container") -> Labelled:
    labels = {LABEL_SESSION: session, LABEL_HOST: host, LABEL_PID: str(pid)}
    return Labelled(kind, f"{session}-{kind}-{pid}", f"name-{session}", labels)


def test_a_session_is_stale_only_when_its_process_on_this_host_is_gone() -> None:
    items = [
        item("dead", pid=7),
        item("dead", pid=7, kind="network"),
        item("alive", pid=8),
        item("mine", pid=9),
        item("elsewhere", host="h2", pid=7),  # another host: its pids mean nothing here
        Labelled("volume", "v", "v", {LABEL_SESSION: "nopid", LABEL_HOST: "h1"}),
    ]
    stale = stale_sessions(items, current="mine", host="h1", alive=lambda pid: pid in {8, 9})
    assert stale == {"dead", "nopid"}


def test_objects_without_a_session_label_are_ignored() -> None:
    foreign = Labelled("container", "c", "c", {"com.example": "x"})
    assert stale_sessions([foreign], current="s", host="h1", alive=lambda _: False) == set()


@given(st.from_regex(r"[0-9a-f]{12}", fullmatch=True), st.integers(min_value=1, max_value=999))
def test_project_names_give_back_their_session(session: str, number: int) -> None:
    project = Session(id=session).labels("x", "y")[LABEL_SESSION]
    assert project == session
    assert session_of_project(f"{PROJECT_PREFIX}{session}-{number}") == session


@pytest.mark.parametrize("name", ["layer4lab", "l4tc-", "l4tc-abc", "l4tc-abc-x", "l4lab-e2e-1"])
def test_other_project_names_belong_to_no_session(name: str) -> None:
    assert session_of_project(name) is None


def test_a_session_numbers_its_projects_and_labels_everything() -> None:
    session = Session(id="0123456789ab", host="h", pid=42)
    assert [session.next_project(), session.next_project()] == [
        "l4tc-0123456789ab-1",
        "l4tc-0123456789ab-2",
    ]
    assert session.labels("proxy", "p")[LABEL_PID] == "42"
    assert session_of_project(session.marker) is None  # the marker is a volume, no project


def test_describe_reaped_names_sessions_and_counts() -> None:
    assert describe_reaped([]) == "no leftovers of earlier test sessions"
    said = describe_reaped([item("s1"), item("s1", kind="network"), item("s2")])
    assert said == (
        "removed leftovers of killed test sessions of session(s) s1, s2: "
        "2 container(s), 1 network(s)"
    )


def test_owned_tar_gives_every_file_to_the_service_uid_with_its_mode() -> None:
    archive = owned_tar({"/certs/a.key": (b"secret", 0o600), "/etc/x/c.yaml": (b"k: v\n", 0o644)})
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert set(members) == {"certs/a.key", "etc/x/c.yaml"}
        assert {(m.uid, m.gid) for m in members.values()} == {(10001, 10001)}
        assert members["certs/a.key"].mode == 0o600
        assert members["etc/x/c.yaml"].mode == 0o644
        extracted = tar.extractfile(members["certs/a.key"])
        assert extracted is not None
        assert extracted.read() == b"secret"


CERTS = Certificates(
    {
        name: name.encode()
        for name in ("ca.pem", "server.pem", "server.key", "client.a.pem", "client.a.key")
    }
)


def test_each_service_gets_only_its_own_material() -> None:
    assert CERTS.for_proxy() == {
        "/certs/ca.pem": (b"ca.pem", 0o644),
        "/certs/server.pem": (b"server.pem", 0o644),
        "/certs/server.key": (b"server.key", 0o600),
    }
    assert set(CERTS.for_client("client.a")) == {
        "/certs/ca.pem",
        "/certs/client.a.pem",
        "/certs/client.a.key",
    }
    assert CERTS.for_client("client.a")["/certs/client.a.key"][1] == 0o600
    assert set(CERTS.for_client(None)) == {"/certs/ca.pem"}  # --no-cert


def test_a_missing_pair_is_named_with_what_was_issued() -> None:
    with pytest.raises(KeyError, match=r"no client\.z\.pem among .*client\.a\.pem"):
        CERTS.for_client("client.z")


def test_compose_log_lines_are_parsed_past_prefixes_and_escapes() -> None:
    text = (
        'client-a-1  | {"ts":"2026-11-29T14:00:00.000Z","event":"attempt","outcome":"ok"}\n'
        "\x1b[2Kclient-a-1  | not json\n"
        '\x1b[2Kclient-a-1  | {"ts":"2026-11-29T14:00:01.000Z","event":"summary"}\n'
    )
    lines = json_lines(text, "client-a")
    assert [line.event for line in lines] == ["attempt", "summary"]
    assert lines[0].ts == pytest.approx(1_795_960_800.0)


def _code_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.DOTALL)


def test_the_readme_example_is_the_file_the_e2e_tier_runs() -> None:
    blocks = _code_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    example = ROOT / "examples" / "testcontainers"
    for name in ("conftest.py", "test_proxy_example.py"):
        assert (example / name).read_text(encoding="utf-8") in blocks, name
