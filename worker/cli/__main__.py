"""`python -m worker.cli ...`: the `headrace` command line run as a module (tests and bulk's local worker)."""

from __future__ import annotations

import sys

from worker.cli import main

sys.exit(main())
