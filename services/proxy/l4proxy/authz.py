"""Authorization: which upstreams may a client identity reach (pure).

Rules are matched in order against (client identity, upstream); the first match wins,
otherwise the default applies. A rule names an upstream by address or name; a member
of a discovered group also answers to its group's name, so a rule naming the group
holds for every member it has now or gets later. Identities are compared as whole strings after
normalization (:func:`l4proxy.identity.normalize_identity`, per ``tls.identity_charset``):
the rules' client names are normalized when the config is loaded, the certificate's
identity at the handshake, so ``Client.A`` and ``client.a`` are one identity here and
this module compares plain strings. Any character an identity may hold (``-``, ``.``,
``:``, ``/``) is safe in a rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .config import ANY, Action, Rule, Upstream


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    rule: int | None  # index of the matching rule, None when the default applied

    @property
    def allowed(self) -> bool:
        return self.action == "allow"


class Authorizer:
    CACHE_LIMIT = 10_000

    def __init__(
        self, rules: Sequence[Rule], default: Action, upstreams: Sequence[Upstream]
    ) -> None:
        self.rules = tuple(rules)
        self.default: Action = default
        self.upstreams = tuple(upstreams)
        self._cache: dict[str, tuple[int, ...]] = {}

    def decide(self, identity: str, upstream: Upstream) -> Verdict:
        if upstream.group is None:
            labels: tuple[str, ...] = (upstream.key, upstream.name, ANY)
        else:
            labels = (upstream.key, upstream.name, upstream.group, ANY)
        return self._first_match(identity, labels)

    def group_allows(self, identity: str, group: str) -> bool:
        """Whether ``identity`` may reach members of ``group`` as far as rules naming the
        group (or ``*``) say: asked of a group that has no members yet, where no rule
        naming a member's address can apply."""
        return self._first_match(identity, (group, ANY)).allowed

    def _first_match(self, identity: str, labels: tuple[str, ...]) -> Verdict:
        for number, rule in enumerate(self.rules):
            if (identity in rule.clients or ANY in rule.clients) and any(
                label in rule.upstreams for label in labels
            ):
                return Verdict(rule.action, number)
        return Verdict(self.default, None)

    def allowed(self, identity: str) -> tuple[int, ...]:
        """Indices of the upstreams ``identity`` may reach, in pool order (cached)."""
        hit = self._cache.get(identity)
        if hit is None:
            hit = tuple(
                i
                for i, upstream in enumerate(self.upstreams)
                if self.decide(identity, upstream).allowed
            )
            if len(self._cache) >= self.CACHE_LIMIT:
                self._cache.clear()
            self._cache[identity] = hit
        return hit
