"""The one error type of configuration parsing, shared by the services."""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad configuration. ``key`` names what is wrong: a dotted key path in the proxy's
    YAML (``timeouts.idle``) or an option and its variable (``--delay/UPSTREAM_DELAY``);
    ``problem`` says what is wrong with it. The message is ``"<key>: <problem>"`` (just
    the problem when there is no key)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}" if key else problem)
        self.key = key
        self.problem = problem

    def __reduce__(self) -> tuple[type[ConfigError], tuple[str, str]]:
        # ValueError pickles as cls(*args), and args holds the one message: rebuild from
        # the two parts instead, so the error survives a process boundary.
        return type(self), (self.key, self.problem)
