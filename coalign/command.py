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
printed as one line, ``coalign <tool>: error: ...``, with exit code 2; any other failure of a run is one line
``coalign <tool>: failed: ...`` with exit code 1. ``--debug`` anywhere on the command line (or
``COALIGN_DEBUG=1``) lets the exception through with its traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter

__all__ = [
    "build_parser",
    "run_command",
    "report_errors",
    "debug_requested",
    "UserError",
    "HelpFormatter",
    "shipped_configs",
    "resolve_config",
    "resolve_config_args",
]


class HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help, keeping the line breaks of the description and the examples in the epilog."""


class UserError(Exception):
    """An error the user can fix from its message alone; printed as one line, never as a traceback."""


#: exceptions that mean bad input (a missing or malformed file, a bad value): exit code 2
USER_ERRORS = (UserError, OSError, ValueError, LookupError)


def debug_requested(argv: list[str]) -> bool:
    """Remove ``--debug`` from ``argv`` (in place); True when it was there or ``COALIGN_DEBUG`` is set."""
    found = "--debug" in argv
    while "--debug" in argv:
        argv.remove("--debug")
    return found or os.environ.get("COALIGN_DEBUG", "") not in ("", "0")


_CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
_NAME = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_./-]*")


def shipped_configs() -> Path | None:
    """The folder of the configs shipped with coalign: ``coalign/configs`` in an installed wheel, the
    repository's ``configs/`` in a source checkout (an editable install); None when neither exists."""
    here = Path(__file__).resolve().parent
    for folder in (here / "configs", here.parent / "configs"):
        if (folder / "quickstart.yaml").is_file():
            return folder
    return None


def _config_names(root: Path) -> list[str]:
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


def resolve_config(value: str) -> str:
    """A ``--config`` value as a file: an existing path (or inline YAML) unchanged, else a shipped config by name.

    ``quickstart``, ``trainer/cpu``, ``model/coalign_tiny`` or ``supervised_cirr`` (a unique file name in a
    subfolder) name the YAML files shipped with coalign; ``configs/quickstart.yaml`` that does not exist in the
    working directory (the README's commands, run from outside a clone) is looked up there too.

    Raises:
        UserError: a name (no suffix) that no shipped config has; the message lists them.
    """
    if not _NAME.fullmatch(value) or Path(value).exists():
        return value  # inline YAML/JSON, or a file that exists
    name = value.removeprefix("./").removeprefix("configs/")
    suffix = Path(name).suffix
    if suffix in _CONFIG_SUFFIXES:
        name = name[: -len(suffix)]
    elif suffix:
        return value
    root = shipped_configs()
    if root is not None:
        exact = root / f"{name}.yaml"
        if exact.is_file():
            return str(exact)
        by_stem = list(root.rglob(f"{name}.yaml")) if "/" not in name else []
        if len(by_stem) == 1:
            return str(by_stem[0])
    if suffix:
        return value  # a file name the user meant: let the parser say it does not exist
    names = ", ".join(_config_names(root)) if root is not None else "none (no configs folder is installed)"
    raise UserError(f"--config {value}: no such file, nor a shipped config of that name; shipped configs: {names}")


def resolve_config_args(argv: Sequence[str]) -> list[str]:
    """``argv`` with every ``--config VALUE`` / ``--config=VALUE`` / ``-c VALUE`` passed through
    :func:`resolve_config`."""
    out = list(argv)
    i = 0
    while i < len(out):
        arg = out[i]
        if arg in ("--config", "-c") and i + 1 < len(out):
            out[i + 1] = resolve_config(out[i + 1])
            i += 1
        elif arg.startswith("--config="):
            out[i] = "--config=" + resolve_config(arg.split("=", 1)[1])
        i += 1
    return out


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if isinstance(err, USER_ERRORS) else f"{type(err).__name__}: {text}"


@contextlib.contextmanager
def report_errors(prog: str, debug: bool) -> Iterator[list[int]]:
    """Turn an exception of the block into one line on stderr and an exit code in the yielded list.

    Bad input (:data:`USER_ERRORS`) gives exit code 2 (``prog: error: ...``), any other exception 1 (``prog:
    failed: ...``, with a hint to rerun with ``--debug``). With ``debug`` the exception propagates unchanged.
    """
    code = [0]
    try:
        yield code
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:  # noqa: BLE001  every failure of a command becomes one readable line
        if debug:
            raise
        if isinstance(err, USER_ERRORS):
            print(f"{prog}: error: {_one_line(err)}", file=sys.stderr)
            code[0] = 2
        else:
            print(f"{prog}: failed: {_one_line(err)} (rerun with --debug for the traceback)", file=sys.stderr)
            code[0] = 1


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
        formatter_class=HelpFormatter,
        exit_on_error=True,
        default_env=False,
    )
    parser.add_argument(
        "--config",
        action=ActionConfigFile,
        help="a YAML file of these options, or the name of a shipped one (CLI flags win)",
    )
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
    adjust: Callable[[Any], None] | None = None,
) -> int:
    """Parse ``argv`` for ``fn``, call it, and return its exit code (2 on a user error, printed as one line).

    ``adjust(config)``, when given, may change the parsed namespace before the arguments are built (a ValueError
    it raises is a user error like any other)."""
    argv = list(argv)
    debug = debug_requested(argv)
    parser = build_parser(fn, prog, description, epilog, positional)
    with report_errors(prog, debug) as code:
        try:
            config = parser.parse_args(resolve_config_args(argv))
        except SystemExit as exit_:  # --help, --print_config or a usage error jsonargparse already printed
            return int(exit_.code or 0)
        if adjust is not None:
            adjust(config)
        init = parser.instantiate_classes(config)
        kwargs = {name: init[name] for name in inspect.signature(fn).parameters if name in init}
        code[0] = int(fn(**kwargs) or 0)
    return code[0]
