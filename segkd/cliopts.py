"""Typer options generated from the config dataclasses, so each option is defined once (on its field).

:func:`config_parameters` turns the fields of a config dataclass (:mod:`segkd.engine.config`) into Typer options:
the field's type, default, help and flags (``--field-name`` unless :func:`~segkd.engine.config.option` names
others; a bool gets ``--x/--no-x``, so a flag can also switch off what a config file switched on).
:func:`method_flag_parameters` does the same for the method options that have a flag of their own
(``metadata={"flag": ...}`` on a method's options field, e.g. ``--c2vkd-add-ce``). :func:`resolve_config` builds
the config of one command line: dataclass defaults, then the ``--config`` file, then the flags actually typed.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import MISSING, Field, fields
from typing import Annotated, Any

import typer

from segkd.errors import SegkdError

try:  # typer >= 0.20 vendors its own click
    from typer._click.core import ParameterSource
    from typer._click.globals import get_current_context
except ImportError:  # pragma: no cover - older typer runs on click itself
    from click.core import ParameterSource
    from click.globals import get_current_context

EXPLICIT = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


def _flag_of(f: Field) -> str:
    return f"--{f.name.replace('_', '-')}"


def _option(hint: Any, default: Any, decls: Iterable[str], help_text: str) -> tuple[Any, Any]:
    """The (annotation, default) of one generated option."""
    return Annotated[hint, typer.Option(*decls, help=help_text)], default


REQUIRED_MARK = "[required: here, in --config, or from --resume]"


def _help_order(cls: type, first: Sequence[str]) -> list[Field]:
    """The fields of ``cls`` with ``first`` (by name) leading, in that order: what a command's ``--help`` lists
    first (``distill``: the method and the teacher, not the ~40 generic options before them)."""
    by_name = {f.name: f for f in fields(cls)}
    return [by_name[n] for n in first if n in by_name] + [f for f in fields(cls) if f.name not in first]


def config_parameters(cls: type, *, exclude: Iterable[str] = (), first: Sequence[str] = ()) -> list[inspect.Parameter]:
    """Typer options for the fields of ``cls``, positional arguments first (``option(..., argument=True)``), then
    the fields named in ``first``. Required fields default to ``None`` so a missing one is caught with the
    ``--config`` file and ``--resume`` in view (:func:`resolve_config`); their help says they are required. A list
    field given no value keeps its factory default."""
    hints = typing.get_type_hints(cls)
    arguments, params = [], []
    for f in _help_order(cls, first):
        if f.name in exclude or not f.metadata.get("cli", True):
            continue
        flags, help_text = tuple(f.metadata.get("flags") or ()), f.metadata.get("help", "")
        help_text = help_text() if callable(help_text) else help_text  # generated from a registry when built
        if f.metadata.get("required"):
            help_text = f"{help_text}  {REQUIRED_MARK}"
        hint = hints[f.name]
        default = None if f.metadata.get("required") else (f.default if f.default is not MISSING else None)
        if f.metadata.get("argument"):  # a positional argument (a list field takes any number of them)
            arguments.append(inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                                               annotation=Annotated[hint | None, typer.Argument(help=help_text)]))
            continue
        flags = flags or (_flag_of(f),)
        if hint is bool:
            long = next(d for d in flags if d.startswith("--"))
            flags = (f"{long}/--no-{long[2:]}", *(d for d in flags if not d.startswith("--")))
        elif f.metadata.get("required") or f.default is MISSING:  # a list's default comes from its factory
            hint = hint | None
        annotation, default = _option(hint, default, flags, help_text)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=annotation))
    return arguments + params


def command_parameters(cls: type, *stubs: Callable[..., Any], exclude: Iterable[str] = (),
                       between: Sequence[inspect.Parameter] = (), first: Sequence[str] = ()) -> list[inspect.Parameter]:
    """A command's whole signature: the ``stubs``' parameters without a default (arguments, required options)
    first, as declared; then the options of ``cls``'s fields; then ``between``; then the stubs' other parameters
    (output options, ``--resume``...), keyword-only. A stub is a function whose signature declares the command's
    options that are not config fields."""
    own = [p for stub in stubs for p in inspect.signature(stub, eval_str=True).parameters.values()]
    leading = [p for p in own if p.default is inspect.Parameter.empty]
    rest = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own if p.default is not inspect.Parameter.empty]
    return leading + config_parameters(cls, exclude=exclude, first=first) + list(between) + rest


def method_flags() -> dict[str, tuple[str, Field]]:
    """Every method option with a flag of its own: ``{flag: (method, field)}`` (one place: the options field)."""
    from segkd.methods import METHODS  # lazy CLI start: the methods import torch

    out: dict[str, tuple[str, Field]] = {}
    for name in METHODS:
        for f in fields(METHODS.get(name).options):
            if "flag" in f.metadata:
                out[f.metadata["flag"]] = (name, f)
    return out


def flag_param_name(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def method_flag_parameters() -> list[inspect.Parameter]:
    """Typer options for :func:`method_flags`: a bool option is a switch (``--no-x`` turns off an option that is
    on by default), any other takes a value, converted by the method's own option parser."""
    params = []
    for flag, (method, f) in method_flags().items():
        help_text = f"{method}: {f.metadata.get('help', '')}"
        hint, default = (bool, False) if typing.get_type_hints(_owner(method)).get(f.name) is bool else (
            str | None, None)
        annotation, default = _option(hint, default, (flag,), help_text)
        params.append(inspect.Parameter(flag_param_name(flag), inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=annotation))
    return params


def _owner(method: str) -> type:
    from segkd.methods import METHODS  # lazy CLI start: the methods import torch

    return METHODS.get(method).options


def method_opts_from_flags(method: str, values: dict[str, Any]) -> dict[str, Any]:
    """The method options set by :func:`method_flag_parameters` on one command line; a flag of another method is
    refused in one line."""
    from segkd.methods import METHODS  # lazy CLI start: the methods import torch

    name = METHODS.canonical(method)
    opts: dict[str, Any] = {}
    for flag, (owner, f) in method_flags().items():
        value = values.get(flag_param_name(flag))
        if value is None or value is False:
            continue
        if owner != name:
            raise SegkdError(f"{flag} is a {owner} option; --method is {name}")
        opts[f.name] = (not flag.startswith("--no-")) if value is True else str(value)
    return opts


def explicit_names(values: dict[str, Any]) -> set[str]:
    """The options typed on the command line (or set through the environment), not left at their default."""
    ctx = get_current_context(silent=True)
    if ctx is None:  # called as a function: every value given counts
        return {k for k, v in values.items() if v is not None}
    return {k for k in values if ctx.get_parameter_source(k) in EXPLICIT}


def resolve_config(cls: type, values: dict[str, Any], config: str | None,
                   siblings: Callable[[], Sequence[type]] | None = None) -> tuple[Any, set[str]]:
    """The ``cls`` config of one command line: its defaults, overridden by the ``--config`` file, overridden by
    the flags actually typed; and the names that were set (by the file or a flag), for required-option checks.
    The config's ``sources`` attribute maps the names the file set to ``--config FILE`` (for error lines)."""
    from segkd.engine.config import config_values, read_config_file  # lazy CLI start: the config modules load torch

    base = config_values(cls, read_config_file(config), str(config), siblings or run_configs) if config else {}
    names = {f.name for f in fields(cls)}
    typed = {k: values[k] for k in explicit_names(values) if k in names}
    merged = {**base, **typed}
    cfg = cls(**merged)
    cfg.sources = {k: f"--config {config}" for k in base if k not in typed}
    return cfg, set(merged)


def run_configs() -> list[type]:
    """The config classes of the run commands (a config file's "a distill option" hint names the other one)."""
    from segkd.engine.config import TrainConfig  # lazy CLI start: the run configs import torch
    from segkd.runs.distill import DistillConfig  # lazy CLI start: imports the methods

    return [TrainConfig, DistillConfig]


def with_signature(fn: Callable[..., Any], params: list[inspect.Parameter]) -> Callable[..., Any]:
    """``fn(**values)`` with the generated ``params`` as its signature (what Typer reads)."""
    fn.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    fn.__annotations__ = {p.name: p.annotation for p in params}
    return fn
