"""Unit tests for upstream.config: the --proxy-protocol option.

(The other options are tested with the service, in tests/integration/test_upstream_service.py.)
"""

from __future__ import annotations

import pytest

from upstream import config as up_config

ENV = "UPSTREAM_PROXY_PROTOCOL"


def test_accepted_values_come_from_the_literal() -> None:
    assert up_config.PROXY_PROTOCOLS == ("none", "v2")
    assert up_config.MODES == ("reply", "echo", "sink")
    assert up_config.FAULTS == ("none", "close", "reset")


def test_proxy_protocol_defaults_to_none() -> None:
    assert up_config.load_config([], {}).proxy_protocol == "none"
    assert up_config.Config(host="h", port=1, name="n").proxy_protocol == "none"


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        (["--proxy-protocol", "v2"], {}, "v2"),
        ([], {ENV: "v2"}, "v2"),
        ([], {ENV: " V2 "}, "v2"),
        (["--proxy-protocol", "none"], {ENV: "v2"}, "none"),  # the command line wins
        (["--proxy-protocol", "v2"], {ENV: "none"}, "v2"),
    ],
)
def test_proxy_protocol_from_command_line_or_environment(
    argv: list[str], env: dict[str, str], expected: str
) -> None:
    assert up_config.load_config(argv, env).proxy_protocol == expected


@pytest.mark.parametrize(
    ("argv", "env"),
    [(["--proxy-protocol", "v1"], {}), ([], {ENV: "yes"}), (["--proxy-protocol", ""], {})],
)
def test_bad_proxy_protocol_names_the_option_and_the_variable(
    argv: list[str], env: dict[str, str]
) -> None:
    with pytest.raises(up_config.ConfigError) as caught:
        up_config.load_config(argv, env)
    message = str(caught.value)
    assert f"--proxy-protocol/{ENV}" in message
    assert "none, v2" in message


def test_help_documents_proxy_protocol() -> None:
    text = " ".join(up_config.build_parser({}).format_help().split())
    assert "--proxy-protocol" in text
    assert ENV in text
    assert "default none" in text


def test_the_control_socket_is_off_unless_asked_for() -> None:
    assert up_config.load_config([], {}).control is None
    assert up_config.load_config([], {"UPSTREAM_CONTROL": ""}).control is None
    env = {"UPSTREAM_CONTROL": "/tmp/u.ctl"}
    assert up_config.load_config([], env).control == "/tmp/u.ctl"
    assert up_config.load_config(["--control", "/run/x"], env).control == "/run/x"
