"""Errors segkd reports to users as one plain line (never a traceback)."""

from __future__ import annotations


class SegkdError(Exception):
    """Bad input or an impossible request. The CLI prints ``error: <message>`` and exits with ``exit_code``."""

    exit_code = 1


class GateFailure(SegkdError):
    """A CI gate or a verification threshold was not met (distinct exit code so CI can tell it from a crash)."""

    exit_code = 3

