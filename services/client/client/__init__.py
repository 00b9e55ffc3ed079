"""A synthetic mTLS client for the layer4lab: one connection per attempt, one log line each.

Run it as ``python -m client --id NAME --proxy HOST:PORT``.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
