"""Errors segkd reports to users as one plain line (never a traceback)."""

from __future__ import annotations


class SegkdError(Exception):
    """Bad input or an impossible request. The CLI prints ``error: <message>`` and exits with ``exit_code``;
    ``silent`` errors exit without the line (under torchrun every rank raises, rank 0 alone says it)."""

    exit_code = 1
    silent = False


class GateFailure(SegkdError):
    """A CI gate or a verification threshold was not met (distinct exit code so CI can tell it from a crash)."""

    exit_code = 3

