"""``coalign evaluate`` and ``coalign check-submission``: argument parsing over :mod:`.runner` and :mod:`.submission`.

Both functions take the argument list and return an exit code, so ``coalign.cli`` dispatches to them and tests
call them directly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["evaluate_command", "check_submission_command", "load_model"]

BENCHMARKS = ("fashioniq", "cirr", "circo")
# which protocol options each benchmark accepts (an option given to another benchmark is an error, not ignored)
_OPTIONS = {
    "fashioniq": {"categories", "caption_join", "gallery", "exclude_reference", "image_extension"},
    "cirr": {"labels"},
    "circo": {"query_template", "exclude_reference"},
}

_EPILOG = """\
protocol options (each is recorded in metrics.json as protocol/<name>):
  FashionIQ  --categories (all three), --caption-join clip4cir, --gallery split, --exclude-reference off
  CIRR       --labels hard; the reference image is always removed
  CIRCO      --query-template "{caption}", --exclude-reference off

outputs in --output-dir:
  metrics.json (labelled splits: percentages + protocol), and the rankings in the upload formats:
  cirr_<split>_recall.json, cirr_<split>_recall_subset.json, circo_<split>.json,
  fashioniq_<category>_<split>.json

examples:
  coalign evaluate --model ./my_model --benchmark cirr --root data/CIRR --split test1 --output-dir out/
  coalign evaluate --model owner/coalign-blip2 --benchmark circo --root data/CIRCO --split val \\
      --output-dir out/ --cache-dir ~/.cache/coalign --gallery-dtype float16
"""


def _evaluate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="coalign evaluate",
        description="Evaluate a model on FashionIQ, CIRR or CIRCO with the official protocols and write the "
        "metrics and the test-server files.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="registered model name, checkpoint folder, .ckpt file or Hub id")
    p.add_argument("--benchmark", required=True, choices=BENCHMARKS)
    p.add_argument("--root", required=True, type=Path, help="dataset folder in the official layout")
    p.add_argument("--split", default="val", help="fashioniq: val|test; cirr: val|test1; circo: val|test (default val)")
    p.add_argument("--output-dir", required=True, type=Path, help="folder for metrics.json and the ranking files")
    g = p.add_argument_group("FashionIQ protocol")
    g.add_argument("--categories", nargs="+", choices=("dress", "shirt", "toptee"), help="default: all three")
    g.add_argument(
        "--caption-join",
        choices=("clip4cir", "reversed", "lowercase", "both_orders"),
        help="query text from the two captions. clip4cir (default): '<C0> and <c1>' stripped of '.?, ' with c0 "
        "capitalised (CLIP4Cir/SPRC); reversed: c1 first; lowercase: 'c0 and c1' lower-cased; both_orders: "
        "encode clip4cir and reversed, average the query features",
    )
    g.add_argument(
        "--gallery",
        choices=("split", "val_union"),
        help="split (default): split.<category>.<split>.json; val_union: only the queries' references and "
        "targets (used by some papers; inflates scores)",
    )
    g.add_argument("--image-extension", choices=(".png", ".jpg"), help="default: detected from the images folder")
    g = p.add_argument_group("FashionIQ and CIRCO protocol")
    g.add_argument(
        "--exclude-reference",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="remove each query's reference image from its ranking (default off; CIRR always removes it)",
    )
    g = p.add_argument_group("CIRR protocol")
    g.add_argument(
        "--labels",
        choices=("hard", "soft"),
        help="hard (default): Recall on target_hard; soft: best target_soft value in the top K (CIRR authors)",
    )
    g = p.add_argument_group("CIRCO protocol")
    g.add_argument(
        "--query-template",
        help="query text, a format string over {caption} and {shared_concept} (default '{caption}'); e.g. "
        "'a photo of $ that {caption}', 'find {shared_concept} but {caption}'",
    )
    g = p.add_argument_group("running")
    g.add_argument("--batch-size", type=int, default=32, help="queries / gallery images per batch (default 32)")
    g.add_argument("--num-workers", type=int, default=4, help="image loading workers (default 4)")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--cache-dir", type=Path, help="cache gallery features here (safetensors), keyed by model+dataset")
    g.add_argument(
        "--gallery-dtype",
        choices=("float32", "float16", "bfloat16"),
        help="storage dtype of the gallery features on the CPU (default: the model's; float16 halves CIRCO's)",
    )
    g.add_argument(
        "--target-pad-ratio",
        type=float,
        help="pad images wider than this aspect ratio before resizing (CLIP4Cir/SPRC use 1.25); default: the "
        "model's own preprocessing",
    )
    g.add_argument("--random-init", action="store_true", help="registered names only: random weights (smoke tests)")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def load_model(spec: str, random_init: bool = False):
    """A model from a registered name, a ``save_pretrained`` folder, a Lightning ``.ckpt`` or a Hub id."""
    from coalign.factory import load_model as load

    try:
        return load(spec, random_init=random_init)
    except NotImplementedError as err:
        raise ValueError(f"{spec} has no published weights ({err}); --random-init builds it untrained") from None


def _datamodule(args: argparse.Namespace, transform):
    from coalign.datamodules import CIRCODataModule, CIRRDataModule, FashionIQDataModule

    given = {k for k in set().union(*_OPTIONS.values()) if getattr(args, k) is not None}
    wrong = sorted(given - _OPTIONS[args.benchmark])
    if wrong:
        flags = ", ".join("--" + w.replace("_", "-") for w in wrong)
        raise ValueError(f"{flags} do(es) not apply to {args.benchmark}")
    options = {k: getattr(args, k) for k in given}
    common = {"batch_size": args.batch_size, "num_workers": args.num_workers, "image_transform": transform}
    cls = {"fashioniq": FashionIQDataModule, "cirr": CIRRDataModule, "circo": CIRCODataModule}[args.benchmark]
    return cls(args.root, **options, **common)


def evaluate_command(argv: list[str]) -> int:
    """``coalign evaluate ...``; returns the exit code."""
    try:
        args = _evaluate_parser().parse_args(argv)
    except SystemExit as exit_:  # --help, or argparse's own usage error (already printed)
        return int(exit_.code or 0)
    import torch

    from coalign.transforms import ImageTransform

    from .runner import evaluate, format_table

    try:
        model = load_model(args.model, random_init=args.random_init)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = model.to(device)
        transform = model.preprocess
        if args.target_pad_ratio is not None:
            transform = ImageTransform(**{**transform.config(), "target_pad_ratio": args.target_pad_ratio})
        datamodule = _datamodule(args, transform)
        result = evaluate(
            model,
            datamodule,
            args.split,
            args.output_dir,
            cache_dir=args.cache_dir,
            gallery_dtype=args.gallery_dtype,
            model_name=args.model,
            progress=not args.no_progress,
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"coalign evaluate: error: {err}", file=sys.stderr)
        return 2
    print(format_table(result))
    if not result.metrics:
        print(f"\n{args.split} has no labels: no metrics, only the files to upload.")
    print("\nwrote:\n  " + "\n  ".join(str(f) for f in result.files))
    return 0


def check_submission_command(argv: list[str]) -> int:
    """``coalign check-submission FILE --benchmark {cirr,circo} --root DIR --split SPLIT``; exit 1 on any problem."""
    p = argparse.ArgumentParser(
        prog="coalign check-submission",
        description="Check an upload file as the CIRR or CIRCO test server would: every query present, list "
        "lengths (CIRR 50 / 3, CIRCO 50), unique entries, names in the split's gallery, CIRR reference excluded "
        "and subset entries from the image set, size <= 5 MB. Reports every problem found.",
    )
    p.add_argument("file", type=Path, help="the JSON file to upload")
    p.add_argument("--benchmark", required=True, choices=("cirr", "circo"))
    p.add_argument("--root", required=True, type=Path, help="dataset folder in the official layout")
    p.add_argument("--split", help="default: the test split (cirr: test1, circo: test)")
    try:
        args = p.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    from .submission import check_submission

    split = args.split or {"cirr": "test1", "circo": "test"}[args.benchmark]
    try:
        problems = check_submission(args.file, args.benchmark, args.root, split)
    except (FileNotFoundError, ValueError) as err:
        print(f"coalign check-submission: error: {err}", file=sys.stderr)
        return 2
    if problems:
        print(f"{args.file}: {len(problems)} kind(s) of problem for {args.benchmark} {split}:")
        for line in problems:
            print(f"  - {line}")
        return 1
    print(f"{args.file}: OK for {args.benchmark} {split}")
    return 0
