"""The CLI's exit codes (documented in docs/operations.md) and its one error type:
a one-line message on stderr and a distinct code."""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_NOT_FOUND = 4
EXIT_UNREACHABLE = 5
EXIT_LOAD_FAILED = 6


class CliError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code
