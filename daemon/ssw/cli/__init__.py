"""The ``ssw`` command: one function per verb (:mod:`ssw.cli.main` parses and dispatches)."""

from ssw.cli.main import main

__all__ = ["main"]
