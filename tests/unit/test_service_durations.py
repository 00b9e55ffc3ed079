"""The lab services parse durations exactly like the proxy does."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from client.config import parse_duration as client_duration
from l4proxy.config import parse_duration as proxy_duration
from upstream.config import parse_duration as upstream_duration


@given(st.integers(min_value=0, max_value=10**7), st.sampled_from(["ms", "s", "m", "h", ""]))
def test_services_and_proxy_agree(n: int, unit: str) -> None:
    text = f"{n}{unit}"
    expected = proxy_duration(text, "k", allow_zero=True)
    assert client_duration(text, "--x") == expected
    assert upstream_duration(text, "--x") == expected
    if unit == "ms":
        assert expected == n / 1000
