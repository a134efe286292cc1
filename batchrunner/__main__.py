"""`python -m batchrunner` runs the command line."""

from __future__ import annotations

from batchrunner.cli import main

main()
