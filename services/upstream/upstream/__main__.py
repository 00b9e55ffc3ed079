"""``python -m upstream [--listen HOST:PORT] [--name NAME] [--mode reply|echo|sink] ...``."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
