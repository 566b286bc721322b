"""``python -m bench.sidecar_bench``: see the package's docstring."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
