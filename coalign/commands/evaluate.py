"""``coalign evaluate`` and ``coalign check-submission``: typed functions over :mod:`coalign.evaluation`.

The benchmark is chosen as in ``coalign fit``: ``--data CIRRDataModule --data.root data/CIRR``; its protocol
options are the DataModule's own arguments (``--data.labels soft``, ``--data.caption_join both_orders``, ...),
documented in its file under ``datamodules/`` and listed by ``coalign evaluate --data.help CIRRDataModule``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

import torch

from coalign.command import run_command
from coalign.datamodules.benchmark import BenchmarkDataModule
from coalign.evaluation.runner import evaluate as run_evaluation
from coalign.evaluation.runner import result_table
from coalign.factory import load_model
from coalign.transforms import ImageTransform

__all__ = ["evaluate", "check_submission", "evaluate_command", "check_submission_command"]

_EVALUATE_EPILOG = """\
protocol options: the DataModule's arguments, each recorded in metrics.json as protocol/<name>
  (coalign evaluate --data.help FashionIQDataModule lists them):
  FashionIQDataModule  --data.categories, --data.caption_join clip4cir, --data.gallery split,
                       --data.exclude_reference false
  CIRRDataModule       --data.labels hard; the reference image is always removed
  CIRCODataModule      --data.query_template "{caption}", --data.exclude_reference false

outputs in --output_dir:
  metrics.json (labelled splits: percentages + protocol), and the rankings in the upload formats:
  cirr_<split>_recall.json, cirr_<split>_recall_subset.json, circo_<split>.json,
  fashioniq_<category>_<split>.json

examples:
  coalign evaluate --model ./my_model --data CIRRDataModule --data.root data/CIRR --split test1 --output_dir out/
  coalign evaluate --model owner/coalign-blip2 --data CIRCODataModule --data.root data/CIRCO --split val \\
      --output_dir out/ --cache_dir ~/.cache/coalign --gallery_dtype float16
  coalign evaluate --model coalign_tiny --random_init true --data CIRRDataModule --data.root data/CIRR \
      --output_dir /tmp/smoke --progress false   (a smoke test of the files, with random weights)
  coalign evaluate --config eval_cirr.yaml          (a YAML of the same keys; --print_config writes one)
"""

_CHECK_EPILOG = """\
Exit status 0 when the file would be accepted, 1 when a problem was found (each kind listed once), 2 on bad input.

examples:
  coalign check-submission out/cirr_test1_recall.json --data CIRRDataModule --data.root data/CIRR
  coalign check-submission out/circo_test.json --data CIRCODataModule --data.root data/CIRCO --split test
"""


def evaluate(
    model: str,
    data: BenchmarkDataModule,
    output_dir: Path,
    split: str = "val",
    device: str | None = None,
    cache_dir: Path | None = None,
    gallery_dtype: Literal["float32", "float16", "bfloat16"] | None = None,
    target_pad_ratio: float | None = None,
    random_init: bool = False,
    progress: bool = True,
) -> int:
    """Evaluate a model on FashionIQ, CIRR or CIRCO with the official protocols and write the metrics and the
    test-server files.

    Args:
        model: a registered model name, a checkpoint folder written by save_pretrained, a Lightning .ckpt file or
            a Hub id (owner/name).
        data: the benchmark and its protocol options, e.g. --data CIRRDataModule --data.root data/CIRR.
        output_dir: folder for metrics.json and the ranking files.
        split: fashioniq: val|test; cirr: val|test1; circo: val|test.
        device: torch device (default: cuda if available, else cpu).
        cache_dir: cache gallery features here (safetensors), keyed by model and dataset.
        gallery_dtype: storage dtype of the gallery features on the CPU (default: the model's; float16 halves
            CIRCO's).
        target_pad_ratio: pad images wider than this aspect ratio before resizing (CLIP4Cir/SPRC use 1.25);
            default: the model's own preprocessing.
        random_init: registered names only: random weights (smoke tests).
        progress: show progress bars.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    net = load_model(model, random_init=random_init, device=device)
    transform = net.preprocess
    if target_pad_ratio is not None:
        transform = ImageTransform(**{**transform.config(), "target_pad_ratio": target_pad_ratio})
    data.connect(transform)
    result = run_evaluation(
        net,
        data,
        split,
        output_dir,
        cache_dir=cache_dir,
        gallery_dtype=gallery_dtype,
        model_name=model,
        progress=progress,
    )
    print(result_table(result))
    if not result.metrics:
        print(f"\n{split} has no labels: no metrics, only the files to upload.")
    print("\nwrote:\n  " + "\n  ".join(str(f) for f in result.files))
    return 0


def check_submission(file: Path, data: BenchmarkDataModule, split: str | None = None) -> int:
    """Check an upload file as the CIRR or CIRCO test server would: every query present, list lengths (CIRR 50 / 3,
    CIRCO 50), unique entries, names in the split's gallery, CIRR reference excluded and subset entries from the
    image set, size <= 5 MB. Reports every problem found; exit code 1 when there is one.

    Args:
        file: the JSON file to upload.
        data: the benchmark, e.g. --data CIRRDataModule --data.root data/CIRR (only annotation files are read).
        split: default: the benchmark's test split (cirr: test1, circo: test).
    """
    split = split or data.test_split
    problems = data.check_submission(Path(file), split)
    if problems:
        print(f"{file}: {len(problems)} kind(s) of problem for {data.benchmark} {split}:")
        for line in problems:
            print(f"  - {line}")
        return 1
    print(f"{file}: OK for {data.benchmark} {split}")
    return 0


def evaluate_command(argv: list[str]) -> int:
    """``coalign evaluate ...``; returns the exit code."""
    return run_command(evaluate, argv, prog="coalign evaluate", epilog=_EVALUATE_EPILOG)


def check_submission_command(argv: list[str]) -> int:
    """``coalign check-submission FILE --data CIRRDataModule --data.root DIR [--split SPLIT]``."""
    return run_command(
        check_submission, argv, prog="coalign check-submission", epilog=_CHECK_EPILOG, positional=("file",)
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(evaluate_command(sys.argv[1:]))
