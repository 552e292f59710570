"""The coalign command: LightningCLI's fit/validate/test/predict plus coalign's own tools.

fit, validate, test and predict are LightningCLI subcommands over the CoAlign model and any coalign DataModule
(short class names work: --data ShapesDataModule, --trainer.callbacks+=RetrievalReport). evaluate,
check-submission, synthesize, index and search sit beside them: typed functions parsed by jsonargparse like
LightningCLI (same flag style, --config on every subcommand; a shipped config is named without its path:
--config quickstart, --config trainer/cpu).
"""

# Nothing heavy is imported until a subcommand runs: `coalign --help` and `coalign --version` import neither torch
# nor Lightning, each tool is loaded by name when chosen, and Lightning only for fit/validate/test/predict.

from __future__ import annotations

import functools
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jsonargparse import dict_to_namespace

import coalign

from ._cpu import choose_threads, idle_cores
from ._version import __version__
from .command import HelpFormatter, debug_requested, report_errors, resolve_config_args, shipped_configs

# CoAlignCLI is exported too, built on first access (module __getattr__ below): defining it imports Lightning
__all__ = ["find_last_checkpoint", "main", "TOOLS", "LIGHTNING_SUBCOMMANDS"]

log = logging.getLogger("coalign.cli")  # not __name__: `python -m coalign.cli` runs it as __main__

#: LightningCLI's subcommands: name -> (one-line help, examples shown at the end of its --help)
LIGHTNING_SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "fit": (
        "train a model",
        """\
examples:
  coalign fit --config quickstart                              (5 minutes on a CPU, no download)
  coalign fit --config quickstart --ckpt_path last             (resume a killed run)
  coalign fit --config experiments/supervised_cirr --data.root data/CIRR
  coalign fit --config model/coalign_tiny --config data/shapes --config trainer/cpu
  coalign fit --config quickstart --trainer.callbacks+=LearningRateMonitor --trainer.max_steps 100
  coalign fit --config quickstart --print_config > my_run.yaml (every option, to edit)
""",
    ),
    "validate": (
        "evaluate on the validation split",
        """\
examples:
  coalign validate --config experiments/supervised_cirr --data.root data/CIRR \
      --ckpt_path runs/cirr/checkpoints/last.ckpt
  coalign validate --config quickstart --model.init_from runs/quickstart/model
""",
    ),
    "test": (
        "evaluate on the test split (on CIRR/CIRCO: the files to upload)",
        """\
examples:
  coalign test --config experiments/supervised_cirr --data.root data/CIRR --model.init_from runs/cirr/model
  coalign test --config quickstart --ckpt_path runs/quickstart/checkpoints/last.ckpt
""",
    ),
    "predict": (
        "embed the test queries and the gallery (safetensors)",
        """\
Writes queries.safetensors (query, and target when the split has one), queries.json (ids) and, for a
DataModule with a gallery, gallery.safetensors and gallery.json into <default_root_dir>/predictions (or the
output_dir of a configured coalign.callbacks.EmbeddingWriter). A DataModule without predict_dataloader embeds
its test split.

examples:
  coalign predict --config quickstart --model.init_from runs/quickstart/model
  coalign predict --config experiments/supervised_cirr --data.root data/CIRR \\
      --ckpt_path runs/cirr/checkpoints/last.ckpt --trainer.callbacks+=EmbeddingWriter \\
      --trainer.callbacks.output_dir out/cirr_embeddings
""",
    ),
}

#: the tool subcommands beside LightningCLI's: name -> (one-line help, "module:function" taking argv and returning
#: the exit code). Loaded by name when chosen, so one tool never imports another's dependencies.
TOOLS: dict[str, tuple[str, str]] = {
    "evaluate": ("evaluate a model on FashionIQ, CIRR or CIRCO", "coalign.commands.evaluate:evaluate_command"),
    "check-submission": ("check a test-server file", "coalign.commands.evaluate:check_submission_command"),
    "synthesize": ("run the CIRHS synthesis pipeline", "coalign.synthesis.cli:synthesize_command"),
    "index": ("encode a folder of images for search", "coalign.commands.search:index_command"),
    "search": ("search an index by image + text", "coalign.commands.search:search_command"),
    "demo": ("try a model in the browser over an index", "coalign.commands.demo:demo_command"),
}

#: third-party messages that say nothing about the user's run (matched precisely, never a whole category)
_NOISE = (
    # torch deprecations raised from Lightning's own code (lightning/pytorch/utilities/_pytree.py)
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    (r"`torch\.utils\._pytree\._register_pytree_node` is deprecated", FutureWarning),
)


def filter_noise() -> None:
    """Hide the known third-party warnings and tips that say nothing about a run (see ``_NOISE``)."""
    for message, category in _NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
    # Lightning prints its tips ("💡 Tip: ... litlogger/litmodels") through its logger, not as warnings
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_drop_tips)


def _drop_tips(record: logging.LogRecord) -> bool:
    text = record.getMessage()
    return not ("Tip:" in text and ("litlogger" in text or "litmodels" in text or "LitModels" in text))


def find_last_checkpoint(folders: list[Path]) -> Path | None:
    """The newest (by modification time) ``last*.ckpt`` in ``folders`` or their ``**/checkpoints`` subfolders."""
    found = set()
    for folder in folders:
        found.update(folder.glob("last*.ckpt"))
        found.update(folder.glob("**/checkpoints/last*.ckpt"))
    return max(found, key=lambda p: p.stat().st_mtime_ns, default=None)


@functools.cache
def _cli_class() -> type:
    """Build :class:`CoAlignCLI` (Lightning is imported here, when a Lightning subcommand runs, not at start-up)."""
    # reason: Lightning takes seconds to import; `coalign --help`, --version and the tools must not wait for it
    from lightning.pytorch import LightningDataModule

    # reason: as above, Lightning is imported only for fit/validate/test/predict
    from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint, ProgressBar

    # reason: as above
    from lightning.pytorch.cli import LightningCLI

    # reason: as above (a UserWarning from rank zero, as Lightning warns)
    from lightning.pytorch.utilities import rank_zero_warn

    callbacks = coalign.callbacks  # imported before parsing: --trainer.callbacks+=RetrievalReport resolves by name
    factory = coalign.factory

    class CoAlignCLI(LightningCLI):
        """LightningCLI that connects the DataModule to the model's image transform, with ``--test_after_fit``.

        **One optimizer setting**: the model's ``optimizer`` / ``lr_scheduler`` arguments (stored in its hparams
        and ``config.json``); there is no top-level ``--optimizer``. A scheduler's length (``total_steps: null``)
        comes from ``trainer.estimated_stepping_batches``.

        **Checkpoints of ``fit``** go to one fixed folder, ``<default_root_dir>/checkpoints``: every
        ``ModelCheckpoint`` without a ``dirpath`` (Lightning's default one included) is pointed there, instead of
        the ``version_N/checkpoints`` of each new run. ``--ckpt_path last`` then resumes from the newest
        ``last*.ckpt`` (by modification time) of that folder, of any other ``ModelCheckpoint`` folder, or of an
        older run's ``<default_root_dir>/**/checkpoints``; when there is none, a warning says so and the run
        starts from step 0. A ``fast_dev_run`` writes no last checkpoint. ``--test_after_fit`` tests the best
        checkpoint when a ``ModelCheckpoint`` monitors a metric, else the final weights.

        **The progress bar** is :class:`coalign.callbacks.CleanProgressBar` unless one is configured.
        ``validate``/``test`` leave the metrics table to ``RetrievalReport`` when one is configured (no second
        table). ``predict`` writes embeddings with :class:`coalign.callbacks.EmbeddingWriter`.
        """

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("auto_configure_optimizers", False)
            given = kwargs.get("parser_kwargs") or {}
            kwargs["parser_kwargs"] = {"prog": "coalign", "formatter_class": HelpFormatter, **given}
            for name, (_, examples) in LIGHTNING_SUBCOMMANDS.items():
                kwargs["parser_kwargs"].setdefault(name, {}).update(epilog=examples)
            super().__init__(*args, **kwargs)

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument(
                "--test_after_fit",
                type=bool,
                default=False,
                help="After `fit`, run the test loop on the DataModule's held-out split (metrics table, "
                "metrics.json, a picture of results when a RetrievalReport callback is configured).",
            )
            parser.add_argument(
                "--cpu_threads",
                type=int | None,
                default=None,
                help="torch threads when training or evaluating on the CPU. Default: the cores idle at start "
                "(measured over 0.3 s), so a machine where another process keeps a core busy does not make every "
                "operation wait for it; OMP_NUM_THREADS, when set, is used as it is.",
            )

        def before_instantiate_classes(self) -> None:
            """``--model.init_from X``: build X's own architecture (see :func:`coalign.factory.architecture_of`)."""
            config = self.config[self.subcommand] if self.subcommand else self.config
            model = config.get("model")
            source = None if model is None else model.get("init_from")
            if not source:
                return
            for key, value in factory.architecture_of(str(source)).items():
                if key == "local_head" and value is None:
                    continue  # the source has no local head: the YAML may add one
                model[key] = dict_to_namespace(value) if isinstance(value, dict) else value
            log.info(f"--model.init_from {source}: using its architecture ({model['backbone'].class_path})")

        def instantiate_classes(self) -> None:
            super().instantiate_classes()
            # the one hand-over from model to data (see CIRDataModule.connect)
            self.datamodule.connect(self.model.preprocess)
            self._set_cpu_threads()

        def _set_cpu_threads(self) -> None:
            """On the CPU, use the cores idle now (``--cpu_threads``; see :mod:`coalign._cpu`)."""
            import torch  # reason: torch loads with Lightning, only when a Lightning subcommand runs

            requested = self._get(self.config, "cpu_threads", default=None)
            if self.trainer.strategy.root_device.type != "cpu" or (
                requested is None and os.environ.get("OMP_NUM_THREADS")
            ):
                return
            threads = choose_threads(requested, torch.get_num_threads(), None if requested else idle_cores())
            if threads != torch.get_num_threads():
                log.info(f"using {threads} CPU thread(s) of {torch.get_num_threads()} (--cpu_threads; idle cores now)")
                torch.set_num_threads(threads)

        def instantiate_trainer(self, **kwargs: Any):
            configured = self._get(self.config_init, "trainer", default={}).get("callbacks") or []
            configured = configured if isinstance(configured, list) else [configured]
            enabled = self._get(self.config_init, "trainer", default={}).get("enable_progress_bar", True) is not False
            if enabled and not any(isinstance(c, ProgressBar) for c in configured):
                given = self.trainer_defaults.get("callbacks") or []
                given = given if isinstance(given, list) else [given]
                self.trainer_defaults = {**self.trainer_defaults, "callbacks": [*given, callbacks.CleanProgressBar()]}
            return super().instantiate_trainer(**kwargs)

        def before_fit(self) -> None:
            """Point checkpoints at ``<default_root_dir>/checkpoints`` and resolve ``--ckpt_path last`` there."""
            root = Path(self.trainer.default_root_dir)
            folders = []
            for callback in self.trainer.checkpoint_callbacks:
                if isinstance(callback, ModelCheckpoint):
                    callback.dirpath = callback.dirpath or str((root / "checkpoints").resolve())
                    folders.append(Path(callback.dirpath))
                    if self.trainer.fast_dev_run:  # Lightning would still write last.ckpt at the end: a smoke
                        callback.save_last = False  # test's step-1 checkpoint must never be what `last` resumes
            config = self.config_init[self.subcommand]
            if config.get("ckpt_path") == "last":
                found = find_last_checkpoint([*folders, root])
                if found is None:
                    rank_zero_warn(
                        f"--ckpt_path last: no last*.ckpt under {root} (nor in {', '.join(map(str, folders)) or '-'})"
                        ": starting from step 0"
                    )
                else:
                    log.info(f"--ckpt_path last: resuming from {found}")
                config["ckpt_path"] = None if found is None else str(found)

        def after_fit(self) -> None:
            if self.config.get(self.subcommand, {}).get("test_after_fit"):
                best = callbacks.best_checkpoint(self.trainer)
                if best is not None:
                    log.info(f"--test_after_fit: testing the best checkpoint {best}")
                self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best, verbose=False)

        def _quiet_if_reported(self) -> None:
            # RetrievalReport prints the metrics table: Lightning's own table would print the same numbers again
            if any(isinstance(c, callbacks.RetrievalReport) for c in self.trainer.callbacks):
                self.config_init[self.subcommand]["verbose"] = False

        before_validate = _quiet_if_reported
        before_test = _quiet_if_reported

        def before_predict(self) -> None:
            if not any(isinstance(c, BasePredictionWriter) for c in self.trainer.callbacks):
                self.trainer.callbacks.append(callbacks.EmbeddingWriter())

        def predict(self, model, datamodule=None, ckpt_path=None, return_predictions=None, **kwargs: Any):
            """Lightning's predict; a DataModule without ``predict_dataloader`` embeds its test split's queries,
            and the prediction writers get its gallery."""
            if datamodule is None or type(datamodule).predict_dataloader is not LightningDataModule.predict_dataloader:
                return self.trainer.predict(
                    model, datamodule=datamodule, ckpt_path=ckpt_path, return_predictions=return_predictions, **kwargs
                )
            datamodule.setup("test")
            if getattr(datamodule, "has_gallery", False):
                gallery = datamodule.gallery_dataloader(datamodule.evaluation_split("test"))
                for writer in self.trainer.callbacks:
                    if isinstance(writer, callbacks.EmbeddingWriter) and writer.gallery is None:
                        writer.gallery = gallery
            loader = datamodule.test_dataloader()
            kwargs["return_predictions"] = False  # the writers have them; the list would only hold memory
            return self.trainer.predict(model, dataloaders=loader, ckpt_path=ckpt_path, **kwargs)

    CoAlignCLI.__module__ = __name__
    return CoAlignCLI


def __getattr__(name: str) -> Any:
    if name == "CoAlignCLI":  # built on first use: defining it needs Lightning
        return _cli_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _lightning(args: list[str] | None) -> int:
    filter_noise()
    _cli_class()(
        coalign.CoAlign,
        coalign.datamodules.CIRDataModule,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
    )
    return 0


def _load(target: str) -> Callable[[list[str]], int]:
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def _help() -> str:
    rows = [(k, v[0]) for k, v in LIGHTNING_SUBCOMMANDS.items()] + [(k, v[0]) for k, v in TOOLS.items()]
    lines = [f"usage: coalign [-h] [--version] SUBCOMMAND ...\n\n{__doc__.strip()}\n\nsubcommands:"]
    lines += [f"  {name:<17}{text}" for name, text in rows]
    lines.append(
        """
examples:
  coalign fit --config quickstart                 train a tiny model on Shapes (5 minutes on a CPU, no download)
  coalign fit --help                              every training option
  coalign evaluate --model runs/quickstart/model --data CIRRDataModule --data.root data/CIRR --output_dir out/
  coalign index --model runs/quickstart/model --images ~/photos --output ~/photos.index
  coalign search --index ~/photos.index --image ~/photos/beach.jpg --text "at sunset"
  coalign demo --index ~/photos.index              the same in the browser (http://127.0.0.1:7860)

run `coalign SUBCOMMAND --help` for the options of one; add --debug to see a traceback"""
    )
    configs = shipped_configs()
    if configs is not None:
        lines.append(f"shipped configs (--config NAME): {configs}")
    return "\n".join(lines)


def _setup_logging() -> None:
    """coalign's status messages (rank zero) as plain lines on stderr, unless the application set up logging."""
    logger = logging.getLogger("coalign")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _needs_config_hint(argv: list[str]) -> bool:
    """A Lightning subcommand given neither a config nor a model/data, nor asking for help."""
    wanted = ("-c", "--config", "--model", "--data", "-h", "--help", "--print_config")
    return not any(a == w or a.startswith(w + "=") or a.startswith(w + ".") for a in argv[1:] for w in wanted)


def main(argv: list[str] | None = None) -> int:
    """The ``coalign`` command; returns the exit code (0 ok, 1 a failed run, 2 bad input or usage)."""
    from_shell = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    _setup_logging()
    if argv and argv[0] in TOOLS:
        return int(_load(TOOLS[argv[0]][1])(argv[1:]) or 0)
    if not argv or argv[0] in ("-h", "--help"):
        print(_help())
        return 0
    if argv[0] == "--version":
        print(f"coalign {__version__}")
        return 0
    if not argv[0].startswith("-") and argv[0] not in LIGHTNING_SUBCOMMANDS:
        names = ", ".join([*LIGHTNING_SUBCOMMANDS, *TOOLS])
        print(f"coalign: error: unknown subcommand {argv[0]!r}; choose one of: {names}", file=sys.stderr)
        return 2
    if argv[0] in LIGHTNING_SUBCOMMANDS and _needs_config_hint(argv):
        print(
            f"coalign {argv[0]}: error: no config, model or data given; start from a shipped config: "
            f"`coalign {argv[0]} --config quickstart` (`coalign {argv[0]} --help` lists every option)",
            file=sys.stderr,
        )
        return 2
    debug = debug_requested(argv)
    with report_errors(f"coalign {argv[0]}", debug) as code:
        argv = resolve_config_args(argv)
        if from_shell:  # LightningCLI reads sys.argv itself (given both, it warns): hand it the list
            sys.argv[1:] = argv
        _lightning(None if from_shell else argv)
    return code[0]


if __name__ == "__main__":
    sys.exit(main())
