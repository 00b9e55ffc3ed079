"""What each worker holds, as the supervisor counts it (pure).

With ``workers: N`` the supervisor owns the one :class:`~l4proxy.router.Router`: the
token buckets, ``max_concurrent``, the least-connections counts and health are global,
so they are exact whatever worker a connection lands on. A worker asks; the ledger
answers and remembers what it gave to which worker's connection, so that a close, or
the worker's death, gives every slot back exactly once.

Connection ids are the worker's own (unique across workers: see ``IdBlocks``); every
call names the worker and the connection. Calls about a connection the ledger does not
know (closed twice, or a worker that has been restarted) are harmless no-ops.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .balancer import Lease
from .config import Upstream
from .health import Transition
from .router import Admission, Rejected, Router


@dataclass(slots=True)
class Book:
    """One worker's connections: those counted against the caps, those still in their
    handshake, and those admitted (with their slots)."""

    counted: set[int] = field(default_factory=set)
    handshaking: set[int] = field(default_factory=set)
    admissions: dict[int, Admission] = field(default_factory=dict)


class Ledger:
    def __init__(self, router: Router) -> None:
        self.router = router
        self.books: dict[int, Book] = {}
        self.connections = 0  # counted connections, all workers
        self.handshakes = 0  # counted connections still in their handshake

    def book(self, worker: int) -> Book:
        book = self.books.get(worker)
        if book is None:
            book = self.books[worker] = Book()
        return book

    def full(self) -> str | None:
        """The cap one more connection would exceed, if any (the proxy-wide caps)."""
        config = self.router.config
        if config.max_connections and self.connections >= config.max_connections:
            return "max_connections"
        if config.max_handshakes and self.handshakes >= config.max_handshakes:
            return "max_handshakes"
        return None

    def open(self, worker: int, conn: int) -> str | None:
        """A worker accepted ``conn`` and waits before any TLS work. Returns the cap it
        would exceed, or None. Either way it is counted from now: at a cap the worker
        makes room by evicting one of its stalled handshakes, or closes ``conn`` (its
        close comes back here like any other)."""
        full = self.full()
        book = self.book(worker)
        if conn not in book.counted:
            book.counted.add(conn)
            book.handshaking.add(conn)
            self.connections += 1
            self.handshakes += 1
        return full

    def _handshake_over(self, book: Book, conn: int) -> None:
        if conn in book.handshaking:
            book.handshaking.discard(conn)
            self.handshakes -= 1

    def admit(self, worker: int, conn: int, identity: str, now: float) -> Admission | Rejected:
        """``conn`` finished its handshake as ``identity``: the router's admission, held
        for it until :meth:`close`."""
        book = self.book(worker)
        self._handshake_over(book, conn)
        held = book.admissions.pop(conn, None)
        if held is not None:  # a second admit for one connection: a worker's bug
            held.release()
        result = self.router.admit(identity, now)
        if isinstance(result, Admission):
            book.admissions[conn] = result
        return result

    def dial_failed(
        self, worker: int, conn: int, reason: str, now: float
    ) -> tuple[Transition | None, Upstream | None, Lease | Rejected]:
        """The dial for ``conn`` failed: the router marks that upstream down and picks
        the next. Returns the health transition, the upstream that failed, and the
        new lease or the rejection (which gave every slot back)."""
        book = self.book(worker)
        admission = book.admissions.get(conn)
        if admission is None:
            return None, None, Rejected("dial_failed", f"{reason} (connection unknown)")
        failed = admission.lease.upstream
        transition, picked = self.router.dial_failed(admission, now, reason)
        if isinstance(picked, Rejected):
            del book.admissions[conn]
        return transition, failed, picked

    def close(self, worker: int, conn: int) -> None:
        """``conn`` is gone: its slots come back, once."""
        book = self.books.get(worker)
        if book is None:
            return
        admission = book.admissions.pop(conn, None)
        if admission is not None:
            admission.release()
        self._handshake_over(book, conn)
        if conn in book.counted:
            book.counted.discard(conn)
            self.connections -= 1

    def gone(self, worker: int) -> int:
        """The worker died: everything its connections held comes back. Returns how
        many admitted connections it had."""
        book = self.books.pop(worker, None)
        if book is None:
            return 0
        for admission in book.admissions.values():
            admission.release()
        self.connections -= len(book.counted)
        self.handshakes -= len(book.handshaking)
        return len(book.admissions)

    def revocations(self) -> dict[int, list[int]]:
        """Per worker, the admitted connections the current rules no longer let reach
        their upstream (``authorization.on_reload: close``)."""
        out: dict[int, list[int]] = {}
        for worker, book in self.books.items():
            for conn, admission in book.admissions.items():
                if not self.router.permits(admission.identity, admission.lease.upstream):
                    out.setdefault(worker, []).append(conn)
        return out

    def admitted(self) -> int:
        return sum(len(book.admissions) for book in self.books.values())
