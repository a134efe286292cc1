"""`python -m batchrunner` runs the command line."""

from __future__ import annotations

from batchrunner.cli import main

# Guarded: the worker processes of a large submit or export import the main module again.
if __name__ == "__main__":
    main()
