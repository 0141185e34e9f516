"""`python -m station.cli`, as the tests and the tools' subprocesses run it where no `station` script is installed."""

from __future__ import annotations

import sys

from station.cli import main

sys.exit(main())
