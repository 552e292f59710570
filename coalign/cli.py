"""The ``coalign`` command: LightningCLI's fit/validate/test/predict plus coalign's own tools.

``coalign fit|validate|test|predict`` are LightningCLI subcommands over :class:`CoAlign` and any coalign
DataModule (short class names work: ``--data ShapesDataModule``). ``coalign evaluate``, ``check-submission``,
``synthesize``, ``index`` and ``search`` sit beside them: typed functions in :mod:`coalign.commands` and
:mod:`coalign.synthesis.cli`, parsed by jsonargparse like LightningCLI (same flag style, ``--config`` on every
subcommand, see :mod:`coalign.command`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from lightning.pytorch.cli import LightningCLI

from .command import debug_requested, report_errors
from .commands.evaluate import check_submission_command, evaluate_command
from .commands.search import index_command, search_command
from .datamodules import CIRDataModule
from .model import CoAlign
from .synthesis.cli import synthesize_command

__all__ = ["CoAlignCLI", "main"]


class CoAlignCLI(LightningCLI):
    """LightningCLI that connects the DataModule to the model's image transform, with ``--test_after_fit``."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="After `fit`, run the test loop on the DataModule's held-out split (metrics table, metrics.json, "
            "a picture of results when a RetrievalReport callback is configured).",
        )

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        # the one hand-over from model to data (see CIRDataModule.connect)
        self.datamodule.connect(self.model.preprocess)

    def after_fit(self) -> None:
        if self.config.get(self.subcommand, {}).get("test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=None, verbose=False)


def _lightning(args: list[str] | None) -> int:
    CoAlignCLI(
        CoAlign,
        CIRDataModule,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
    )
    return 0


#: the tool subcommands beside LightningCLI's: name -> (one-line help, entry taking argv, returning the exit code)
TOOLS: dict[str, tuple[str, Callable[[list[str]], int]]] = {
    "evaluate": ("evaluate a model on FashionIQ, CIRR or CIRCO", evaluate_command),
    "check-submission": ("check a test-server file", check_submission_command),
    "synthesize": ("run the CIRHS synthesis pipeline", synthesize_command),
    "index": ("encode a folder of images for search", index_command),
    "search": ("search an index by image + text", search_command),
}


def main(argv: list[str] | None = None) -> int:
    """The ``coalign`` command; returns the exit code (0 ok, 1 a failed run, 2 bad input or usage)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    tools = TOOLS
    if argv and argv[0] in tools:
        return int(tools[argv[0]][1](argv[1:]) or 0)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\nsubcommands:")
        for name, text in [
            ("fit", "train a model"),
            ("validate", "evaluate on the validation split"),
            ("test", "evaluate on the test split"),
            ("predict", "embed queries and targets"),
        ] + [(k, v[0]) for k, v in tools.items()]:
            print(f"  {name:<17}{text}")
        print("\nrun `coalign SUBCOMMAND --help` for the options of one; add --debug to see a traceback")
        return 0
    debug = debug_requested(argv)
    with report_errors(f"coalign {argv[0]}", debug) as code:
        _lightning(argv)
    return code[0]


if __name__ == "__main__":
    sys.exit(main())
