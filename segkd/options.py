"""Options are fields: :func:`option` declares a config dataclass field with its CLI metadata (help, flags, ...).

The config dataclasses of every command (``TrainConfig``, ``DistillConfig``, ``EvalConfig``, ``ExportConfig``,
``BenchConfig``) declare their fields with it and :mod:`segkd.cliopts` generates the command's options from them,
so an option is written once. It sits at the bottom of the package (no torch, no segkd imports) because every
floor declares options.
"""

from __future__ import annotations

from dataclasses import MISSING, field
from typing import Any


def option(default: Any = MISSING, help: str = "", *flags: str, machine: bool = False, required: bool = False,
           cli: bool = True, argument: bool = False, path: str | None = None, default_factory: Any = MISSING) -> Any:
    """A config field with its CLI metadata: ``help`` (text, or a function that makes it when the command is built,
    for help generated from a registry); ``flags`` (default ``--field-name``, bools get
    ``--x/--no-x``); ``machine`` = describes the machine, not the run (on ``--resume`` it comes from the new
    command line); ``required`` = the command needs it unless ``--resume``; ``cli=False`` = config files only;
    ``argument`` = a positional argument rather than an option; ``path`` = the value is a path: ``"file"`` or
    ``"dir"`` to read (it must exist), ``"out"`` to write (runs store input paths resolved, see
    :func:`segkd.runs.rundir.resolve_paths`)."""
    meta = {"help": help, "flags": flags, "machine": machine, "required": required, "cli": cli,
            "argument": argument, "path": path}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


# Help of the dataset file-name options, shared by every command that reads a dataset (train, distill, eval,
# export --int8 and data inspect): one text, here because those commands sit on several floors.
IMG_SUFFIX_HELP = ("End of the image file names, extension included, as mmseg's img_suffix (e.g. .jpg or "
                   "_leftImg8bit.png); other files are ignored. folder and mmseg formats (default: every image file).")
SEG_SUFFIX_HELP = ("End of the label file names, as mmseg's seg_map_suffix (e.g. _mask.png): NAME + it labels the "
                   "image NAME + --img-suffix; other files are ignored. folder and mmseg formats (default: detected).")
