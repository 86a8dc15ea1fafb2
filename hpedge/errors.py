"""The one domain exception of hpedge.

Every user-facing mistake (bad path, unknown target, impossible budget, ...) raises
:class:`HpedgeError`. The CLI prints its message as one line and exits with ``exit_code``.
"""

from __future__ import annotations


class HpedgeError(Exception):
    """A user-facing error: one clear line, a nonzero exit code, no traceback."""

    #: Exit code used by the CLI for usage errors.
    USAGE = 2
    #: Exit code of ``hpedge check`` when a package fails parity or was tampered with.
    CHECK_FAILED = 3

    def __init__(self, message: str, exit_code: int = USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code
