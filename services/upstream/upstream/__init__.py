"""A small TCP upstream for the layer4lab: reply, echo or sink, with fault knobs.

Run it as ``python -m upstream``; embed it with :func:`upstream.server.serve`.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
