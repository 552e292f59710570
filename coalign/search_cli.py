"""``coalign index`` and ``coalign search``: search a folder of one's own images by reference image + text.

Both functions take the argument list and return an exit code; ``coalign.cli`` dispatches to them and the tests
call them directly.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

__all__ = ["index_command", "search_command", "load_model"]

_MODEL_HELP = (
    "a registered model name (see `python -c 'import coalign; print(coalign.list_models())'`), a folder written by "
    "save_pretrained (e.g. runs/x/model), a Lightning .ckpt file or a Hub id (owner/name)"
)

_INDEX_EPILOG = """\
The index folder holds index.json (the model, the image folder, skipped files), paths.json and
shards/*.safetensors. A killed run loses at most one shard: run the same command again to finish it;
run it again later to add images new to the folder. Unreadable images are skipped and listed.

examples:
  coalign index --model runs/finetune/model --images ~/photos --output ~/photos.index
  coalign index --model owner/coalign-cirr --images shop/ --output shop.index --device cuda --batch-size 128
"""

_SEARCH_EPILOG = """\
Prints the ranked image paths with their scores; --output also draws the query and its results.
The model defaults to the one recorded in the index; another model is refused (its embeddings differ).

examples:
  coalign search --index ~/photos.index --image ~/photos/beach.jpg --text "the same beach at sunset" -k 5
  coalign search --index shop.index --image dress.jpg --text "in red, sleeveless" --output results.png
"""


def load_model(spec: str, device: str | None = None):
    """A ``CoAlign`` from a registered name, a ``save_pretrained`` folder, a ``.ckpt`` file or a Hub id.

    A registered name gets its published base weights and seeded (so reproducible) untrained heads; a name with
    no published weights (``coalign_tiny``) is seeded random throughout, which is only good for trying the tools.
    """
    import torch

    from coalign.factory import load_model as load

    # index and search build the model separately: the same seed makes a registered name the same model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            model = load(spec)
        except NotImplementedError:
            torch.manual_seed(0)
            model = load(spec, random_init=True)
            warnings.warn(f"{spec} has no published weights: using a seeded random initialisation", stacklevel=2)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval()


def _index_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="coalign index",
        description="Encode every image of a folder (recursively) once, for `coalign search`.",
        epilog=_INDEX_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help=_MODEL_HELP)
    p.add_argument("--images", required=True, type=Path, help="the folder of images to index")
    p.add_argument("--output", required=True, type=Path, help="the index folder to write (or to resume)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--num-workers", type=int, default=2, help="image loading processes (default 2)")
    p.add_argument("--shard-size", type=int, default=1024, help="images per shard file (default 1024)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="storage dtype (default fp32)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="replace an index of another model or folder")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def _search_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="coalign search",
        description="Find the indexed images that match a reference image changed as a text says.",
        epilog=_SEARCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--index", required=True, type=Path, help="an index folder written by `coalign index`")
    p.add_argument("--image", required=True, type=Path, help="the reference image")
    p.add_argument("--text", required=True, help='the modification text, e.g. "the same shoe in black"')
    p.add_argument("-k", "--top-k", dest="k", type=int, default=10, help="number of results (default 10)")
    p.add_argument("--model", help="default: the model recorded in the index; otherwise " + _MODEL_HELP)
    p.add_argument("--output", type=Path, help="write a picture of the query and its results (PNG)")
    p.add_argument(
        "--backend", choices=("auto", "faiss", "torch"), default="auto", help="default auto (FAISS if installed)"
    )
    p.add_argument("--keep-query", action="store_true", help="keep the query image in the results if it is indexed")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    return p


def _load_model(spec: str, device: str | None, command: str):
    """``load_model`` with its warnings (a name with no published weights) printed as one-line notes."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_model(spec, device)
    for w in caught:
        print(f"coalign {command}: note: {w.message}", file=sys.stderr)
    return model


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace | int:
    try:
        return parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error argparse already printed
        return int(exit_.code or 0)


def index_command(argv: list[str]) -> int:
    """``coalign index --model M --images FOLDER --output INDEX_DIR``; returns the exit code."""
    args = _parse(_index_parser(), argv)
    if isinstance(args, int):
        return args
    import torch

    from .index import Index

    try:
        model = _load_model(args.model, args.device, "index")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="skipped .* unreadable")  # reported below, with the list
            index = Index.build(
                model,
                args.images,
                args.output,
                # a folder is recorded absolute, so that `coalign search` finds it from any working directory
                model_name=str(Path(args.model).resolve()) if Path(args.model).exists() else args.model,
                batch_size=args.batch_size,
                num_workers=args.num_workers,
                shard_size=args.shard_size,
                dtype=getattr(torch, args.dtype),
                overwrite=args.overwrite,
                progress=not args.no_progress,
            )
    except (OSError, ValueError) as err:
        print(f"coalign index: error: {err}", file=sys.stderr)
        return 2
    print(f"indexed {len(index)} images of {index.root} into {index.directory}")
    if index.skipped:
        print(f"warning: skipped {len(index.skipped)} unreadable image(s) (listed in index.json):", file=sys.stderr)
        for entry in index.skipped[:5]:
            print(f"  {entry['path']}: {entry['error']}", file=sys.stderr)
    return 0


def search_command(argv: list[str]) -> int:
    """``coalign search --index DIR --image QUERY --text "..." [-k 10] [--output results.png]``."""
    args = _parse(_search_parser(), argv)
    if isinstance(args, int):
        return args
    from .index import Index, draw_results

    try:
        index = Index.load(args.index)
        spec = args.model or index.model_name
        if not spec:
            raise ValueError("the index records no model name; pass --model")
        model = _load_model(spec, args.device, "search")
        results = index.search(model, args.image, args.text, k=args.k, backend=args.backend,
                               exclude_query=not args.keep_query)  # fmt: skip
    except (OSError, ValueError) as err:
        print(f"coalign search: error: {err}", file=sys.stderr)
        return 2
    print(f'{args.image} + "{args.text}"  ({len(index)} images, model {spec})')
    width = len(str(len(results)))
    for rank, (path, score) in enumerate(results, 1):
        print(f"{rank:>{width}}  {score:7.4f}  {path}")
    if args.output:
        draw_results(args.image, args.text, results, args.output)
        print(f"wrote {args.output}")
    return 0
