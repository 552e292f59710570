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
from pathlib import Path

from jsonargparse import dict_to_namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from .command import debug_requested, report_errors
from .commands.evaluate import check_submission_command, evaluate_command
from .commands.search import index_command, search_command
from .datamodules import CIRDataModule
from .factory import architecture_of
from .model import CoAlign
from .synthesis.cli import synthesize_command

__all__ = ["CoAlignCLI", "find_last_checkpoint", "main"]


class CoAlignCLI(LightningCLI):
    """LightningCLI that connects the DataModule to the model's image transform, with ``--test_after_fit``.

    **Checkpoints of ``fit``** go to one fixed folder, ``<default_root_dir>/checkpoints``: every
    ``ModelCheckpoint`` without a ``dirpath`` (Lightning's default one included) is pointed there, instead of
    the ``version_N/checkpoints`` of each new run. ``--ckpt_path last`` then resumes from the newest
    ``last*.ckpt`` (by modification time) of that folder, of any other ``ModelCheckpoint`` folder, or of an
    older run's ``<default_root_dir>/**/checkpoints``; when there is none, a warning says so and the run
    starts from step 0. A ``fast_dev_run`` writes no last checkpoint.
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="After `fit`, run the test loop on the DataModule's held-out split (metrics table, metrics.json, "
            "a picture of results when a RetrievalReport callback is configured).",
        )

    def before_instantiate_classes(self) -> None:
        """``--model.init_from X``: build X's own architecture (see :func:`coalign.factory.architecture_of`)."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        model = config.get("model")
        source = None if model is None else model.get("init_from")
        if not source:
            return
        for key, value in architecture_of(str(source)).items():
            if key == "local_head" and value is None:
                continue  # the source has no local head: the YAML may add one
            model[key] = dict_to_namespace(value) if isinstance(value, dict) else value
        rank_zero_info(f"--model.init_from {source}: using its architecture ({model['backbone'].class_path})")

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        # the one hand-over from model to data (see CIRDataModule.connect)
        self.datamodule.connect(self.model.preprocess)

    def before_fit(self) -> None:
        """Point checkpoints at ``<default_root_dir>/checkpoints`` and resolve ``--ckpt_path last`` there."""
        root = Path(self.trainer.default_root_dir)
        folders = []
        for callback in self.trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint):
                callback.dirpath = callback.dirpath or str((root / "checkpoints").resolve())
                folders.append(Path(callback.dirpath))
                if self.trainer.fast_dev_run:  # Lightning would still write last.ckpt at the end: a smoke test's
                    callback.save_last = False  # step-1 checkpoint must never be what `--ckpt_path last` resumes
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") == "last":
            found = find_last_checkpoint([*folders, root])
            if found is None:
                rank_zero_warn(
                    f"--ckpt_path last: no last*.ckpt under {root} (nor in {', '.join(map(str, folders)) or '-'}): "
                    "starting from step 0"
                )
            else:
                rank_zero_info(f"--ckpt_path last: resuming from {found}")
            config["ckpt_path"] = None if found is None else str(found)

    def after_fit(self) -> None:
        if self.config.get(self.subcommand, {}).get("test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=None, verbose=False)


def find_last_checkpoint(folders: list[Path]) -> Path | None:
    """The newest (by modification time) ``last*.ckpt`` in ``folders`` or their ``**/checkpoints`` subfolders."""
    found = set()
    for folder in folders:
        found.update(folder.glob("last*.ckpt"))
        found.update(folder.glob("**/checkpoints/last*.ckpt"))
    return max(found, key=lambda p: p.stat().st_mtime_ns, default=None)


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
    from_shell = argv is None
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
    if from_shell:  # LightningCLI reads sys.argv itself (given both, it warns): hand it the list without --debug
        sys.argv[1:] = argv
    with report_errors(f"coalign {argv[0]}", debug) as code:
        _lightning(None if from_shell else argv)
    return code[0]


if __name__ == "__main__":
    sys.exit(main())
