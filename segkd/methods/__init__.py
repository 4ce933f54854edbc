"""Distillation methods behind one registry (``METHODS``); see :mod:`segkd.methods.base` for the contract."""

from segkd.methods import c2vkd, collab, cwd, dkd, dml, kd, transkd  # noqa: F401  (registration)
from segkd.methods.base import METHODS, Method, MethodSpec, align_logits, check_pair, make_options, resolve_tap

__all__ = ["METHODS", "Method", "MethodSpec", "align_logits", "check_pair", "make_options", "resolve_tap"]
