"""The connection lifecycle table, without sockets: scripted event sequences and
properties over arbitrary ones (every path ends closed, exactly one End, no action
after it, an error on one side never looks like a clean end on the other)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l4proxy.lifecycle import (
    ADVANCE,
    ENDINGS,
    Action,
    End,
    Event,
    HalfClose,
    Kind,
    Lifecycle,
    Phase,
    Side,
)

OPEN = (Kind.IDENTIFIED, Kind.ADMITTED, Kind.CONNECTED)


def run(*events: Event | Kind, life: Lifecycle | None = None) -> tuple[Lifecycle, list[Action]]:
    life = life or Lifecycle()
    actions: list[Action] = []
    for item in events:
        actions += life.step(item if isinstance(item, Event) else Event(item))
    return life, actions


def forwarding() -> Lifecycle:
    life, actions = run(*OPEN)
    assert (life.phase, actions) == (Phase.FORWARDING, [])
    return life


def test_a_clean_stream_half_closes_each_way_then_ends_with_eof() -> None:
    life, actions = run(Kind.CLIENT_EOF, life=forwarding())
    assert actions == [HalfClose.UPSTREAM]
    assert life.phase is Phase.FORWARDING  # replies still flow back
    life, actions = run(Kind.UPSTREAM_EOF, life=life)
    assert actions == [HalfClose.CLIENT, End("forwarded", "eof")]
    assert life.closed


def test_the_upstream_may_finish_first_and_uploads_go_on() -> None:
    life, actions = run(Kind.UPSTREAM_EOF, Kind.UPSTREAM_EOF, life=forwarding())
    assert actions == [HalfClose.CLIENT]  # once, however often it is reported
    # Its socket closing after its EOF is not an error: the client's half decides.
    _, actions = run(Event(Kind.UPSTREAM_LOST), life=life)
    assert actions == [End("forwarded", "upstream_closed", client=Side.GRACEFUL)]


def test_an_upstream_closing_without_its_eof_aborts_the_client() -> None:
    _, actions = run(Event(Kind.UPSTREAM_LOST), life=forwarding())
    assert actions == [End("forwarded", "upstream_closed", client=Side.ABORT)]


def test_an_upstream_error_aborts_the_client_and_names_the_error() -> None:
    _, actions = run(Event(Kind.UPSTREAM_LOST, "ECONNRESET"), life=forwarding())
    assert actions == [End("forwarded", "upstream_error: ECONNRESET", client=Side.ABORT)]


def test_a_client_leaving_aborts_the_upstream() -> None:
    for detail, reason in (("reset", "client_reset"), ("closed", "client_closed")):
        _, actions = run(Event(Kind.CLIENT_LOST, detail), life=forwarding())
        assert actions == [End("forwarded", reason, Side.KEEP, Side.ABORT)]


@pytest.mark.parametrize(
    ("events", "end"),
    [
        ([Event(Kind.HANDSHAKE_FAILED, "no_shared_cipher")],
         End("tls_failed", "no_shared_cipher", client=Side.LINGER)),
        ([Event(Kind.CLIENT_EOF, "closed_without_data")],
         End("tls_failed", "closed_without_data", client=Side.LINGER)),
        ([Kind.HANDSHAKE_TIMEOUT],
         End("handshake_timeout", "handshake_not_finished", client=Side.ABORT)),
        ([Event(Kind.EVICTED, "max_handshakes 1 reached, no progress for 5 ms")],
         End("over_capacity", "handshake_evicted: max_handshakes 1 reached, no progress for 5 ms",
             client=Side.ABORT)),
        ([Event(Kind.CLIENT_LOST, "closed")],
         End("tls_failed", "connection_lost_during_handshake", client=Side.KEEP)),
        ([Event(Kind.SHUTDOWN, "shutdown")], End("aborted", "shutdown")),
        ([Kind.IDENTIFIED, Event(Kind.REJECTED, "rate", "rate_limited")],
         End("rate_limited", "rate", client=Side.LINGER, close_notify=True)),
        ([Kind.IDENTIFIED, Kind.ADMITTED, Event(Kind.REJECTED, "timeout (after 1 attempt(s))",
                                                "dial_failed")],
         End("dial_failed", "timeout (after 1 attempt(s))", client=Side.LINGER,
             close_notify=True)),
        ([Kind.IDENTIFIED, Kind.ADMITTED, Event(Kind.CLIENT_LOST, "reset")],
         End("aborted", "client_closed_before_upstream", client=Side.KEEP)),
        ([Kind.IDENTIFIED, Kind.ADMITTED, Kind.REVOKED],
         End("aborted", "revoked", close_notify=True)),
        ([*OPEN, Kind.IDLE], End("forwarded", "idle_timeout", close_notify=True)),
        ([*OPEN, Kind.LIFETIME], End("forwarded", "max_lifetime", close_notify=True)),
        ([*OPEN, Kind.REVOKED], End("forwarded", "revoked", close_notify=True)),
        ([*OPEN, Event(Kind.SHUTDOWN, "drain_timeout")],
         End("forwarded", "drain_timeout", close_notify=True)),
        ([*OPEN, Event(Kind.CLIENT_TLS_ERROR, "decryption_failed")],
         End("forwarded", "client_tls_error: decryption_failed", upstream=Side.ABORT)),
        ([*OPEN, Event(Kind.TLS_WRITE_ERROR, "protocol_is_shutdown")],
         End("forwarded", "tls_write_error: protocol_is_shutdown", Side.ABORT, Side.ABORT)),
    ],
)  # fmt: skip
def test_each_ending_says_how_to_close_each_side(events: list[Event | Kind], end: End) -> None:
    life, actions = run(*events)
    assert actions == [end]
    assert life.closed
    assert life.ended == end


def test_events_that_mean_nothing_in_a_phase_change_nothing() -> None:
    life, actions = run(Kind.CLIENT_EOF, Kind.UPSTREAM_EOF, life=run(*OPEN[:2])[0])
    assert (life.phase, actions) == (Phase.DIALING, [])  # the EOF waits in the TLS buffer
    life, actions = run(Kind.IDLE, Kind.LIFETIME, Kind.CONNECTED)  # in the handshake
    assert (life.phase, actions) == (Phase.HANDSHAKE, [])


def test_the_table_covers_every_phase_that_can_end() -> None:
    """Every open phase ends on a lost client and on a shutdown: nothing is left
    open when the socket goes or the proxy stops."""
    for phase in (Phase.HANDSHAKE, Phase.ADMITTING, Phase.DIALING, Phase.FORWARDING):
        for kind in (Kind.CLIENT_LOST, Kind.SHUTDOWN):
            assert (phase, kind) in ENDINGS, (phase, kind)
    # 3 phase changes + 21 endings, and 3 rows in Lifecycle._forwarding (the two EOFs
    # and a clean upstream close, which depend on what has ended already).
    assert (len(ADVANCE), len(ENDINGS)) == (3, 21)


KINDS = list(Kind)
anything = st.lists(
    st.builds(
        Event,
        st.sampled_from(KINDS),
        st.sampled_from(["", "reset", "closed", "ECONNRESET", "why"]),
        st.sampled_from(["", "denied", "rate_limited", "dial_failed"]),
    ),
    max_size=30,
)
# Half the sequences first open the connection (handshake, admission, dial), so that
# what happens while forwarding is explored as much as what happens before.
events = st.one_of(anything, anything.map(lambda rest: [Event(k) for k in OPEN] + rest))


@settings(max_examples=3000, deadline=None)
@given(events, st.sampled_from([Kind.CLIENT_LOST, Kind.SHUTDOWN]))
def test_any_sequence_ends_once_and_nothing_happens_after(
    sequence: list[Event], terminal: Kind
) -> None:
    """Whatever happens in whatever order: at most one End (so every slot is released
    once), no action after it, each direction half-closed at most once and only
    before the End; and a lost client or a shutdown always ends what is still open."""
    life = Lifecycle()
    seen: list[Action] = []
    for event in [*sequence, Event(terminal, "closed")]:
        actions = life.step(event)
        if seen and isinstance(seen[-1], End):
            assert actions == (), "an action after the End"
        seen += actions
    ends = [a for a in seen if isinstance(a, End)]
    assert len(ends) == 1
    assert isinstance(seen[-1], End)
    assert life.closed
    assert life.ended == ends[0]
    assert seen.count(HalfClose.UPSTREAM) <= 1
    assert seen.count(HalfClose.CLIENT) <= 1
    end = ends[0]
    if end.reason.startswith("upstream_error") or (
        end.reason == "upstream_closed" and HalfClose.CLIENT not in seen
    ):
        assert end.client is Side.ABORT  # a crash never looks like a clean end
    if end.reason in ("client_reset", "client_closed"):
        assert end.upstream is Side.ABORT
    if end.decision == "forwarded":
        assert any(event.kind is Kind.CONNECTED for event in sequence)
