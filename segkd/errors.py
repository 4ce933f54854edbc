"""Errors segkd reports to users as one plain line (never a traceback)."""

from __future__ import annotations


class SegkdError(Exception):
    """Bad input or an impossible request. The CLI prints ``error: <message>`` and exits with ``exit_code``."""

    exit_code = 1


class GateFailure(SegkdError):
    """A CI gate or a verification threshold was not met (distinct exit code so CI can tell it from a crash)."""

    exit_code = 3


class UsageError(SegkdError):
    """A bad option value (``--device gpu``, ``--crop 60by80``, ``--method c2vk``): exit 2, the code click and
    argparse give usage errors, so a script can tell a mistyped command line from bad input files (exit 1)."""

    exit_code = 2
