#!/usr/bin/env python3
"""layer4lab's containerized lab: a thin front to :mod:`labkit` (Docker SDK for Python).

    python lab.py list
    python lab.py scenario NAME|all [--keep] [--json] [--report DIR]
    python lab.py up [--topology NAME] | down [--run ID] | clean
    python lab.py fault add TARGET KIND [PARAMS] [--for D] | list | clear [TARGET]

Every container, network and volume a run creates is labelled ``layer4lab.run=<id>``
and removed when the run ends (also on failure, Ctrl-C and SIGTERM).
"""

from __future__ import annotations

import os
import sys

from labkit.cli import main

if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `python lab.py list | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
