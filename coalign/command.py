"""How every ``coalign`` tool subcommand is parsed: one typed function, jsonargparse, ``--config``, one flag style.

LightningCLI already parses ``fit``/``validate``/``test``/``predict`` with jsonargparse; the tools
(``evaluate``, ``check-submission``, ``index``, ``search``, ``synthesize``) are plain functions whose typed
signature and Google-style docstring *are* the command line, parsed the same way::

    def index(model: str, images: Path, output: Path, batch_size: int = 32) -> int:
        '''Encode every image of a folder for ``coalign search``.

        Args:
            model: a registered model name, a checkpoint folder, a .ckpt file or a Hub id.
            ...
        '''

    run_command(index, argv, prog="coalign index")

gives ``--model``, ``--images``, ``--output``, ``--batch_size`` (underscores, as ``--data.batch_size`` in
``coalign fit``), ``--config FILE`` (a YAML of the same keys), ``--print_config`` and a ``--help`` built from the
docstring. A class-typed argument (``data: BenchmarkDataModule``) takes ``--data CIRRDataModule
--data.root ...`` exactly as in ``coalign fit``. Errors that a user can fix (a missing file, a bad value) are
printed as one line, ``coalign <tool>: error: ...``, with exit code 2.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Callable, Sequence
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter

__all__ = ["build_parser", "run_command", "UserError"]


class _HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help, keeping the line breaks of the description and the examples in the epilog."""


class UserError(Exception):
    """An error the user can fix from its message alone; printed as one line, never as a traceback."""


#: exceptions a tool reports as one line (bad paths, bad values, malformed files)
USER_ERRORS = (UserError, OSError, ValueError)


def build_parser(
    fn: Callable[..., Any],
    prog: str,
    description: str | None = None,
    epilog: str | None = None,
    positional: Sequence[str] = (),
) -> ArgumentParser:
    """A jsonargparse parser for ``fn``'s signature with ``--config``.

    Args:
        fn: the command; its parameters become options (``--name``), its docstring the help.
        prog: the name shown in usage lines (``"coalign evaluate"``).
        description: help text above the options; None uses the first paragraph of ``fn``'s docstring.
        epilog: help text below the options (examples).
        positional: parameters given without a flag (``coalign check-submission FILE``).
    """
    doc = inspect.getdoc(fn) or ""
    parser = ArgumentParser(
        prog=prog,
        description=description or doc.split("\n\n")[0],
        epilog=epilog,
        formatter_class=_HelpFormatter,
        exit_on_error=True,
        default_env=False,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of these options (CLI flags win)")
    for name in positional:
        param = inspect.signature(fn).parameters[name]
        parser.add_argument(name, type=param.annotation if not isinstance(param.annotation, str) else str)
    parser.add_function_arguments(fn, skip=set(positional), fail_untyped=True, sub_configs=True)
    return parser


def run_command(
    fn: Callable[..., int | None],
    argv: Sequence[str],
    prog: str,
    description: str | None = None,
    epilog: str | None = None,
    positional: Sequence[str] = (),
) -> int:
    """Parse ``argv`` for ``fn``, call it, and return its exit code (2 on a user error, printed as one line)."""
    parser = build_parser(fn, prog, description, epilog, positional)
    try:
        config = parser.parse_args(list(argv))
    except SystemExit as exit_:  # --help, --print_config or a usage error jsonargparse already printed
        return int(exit_.code or 0)
    try:
        init = parser.instantiate_classes(config)
        kwargs = {name: init[name] for name in inspect.signature(fn).parameters if name in init}
        return int(fn(**kwargs) or 0)
    except USER_ERRORS as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
