"""``coalign index`` and ``coalign search``: search a folder of one's own images by reference image + text.

Each command is a typed function (:func:`build_index`, :func:`search`) whose signature and docstring are its command
line, parsed by :func:`coalign.command.run_command` (``--batch_size``, ``--progress false``, ``--config FILE``).
:func:`index_command` and :func:`search_command` take the argument list and return the exit code;
``coalign.cli`` dispatches to them and the tests call them directly.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Literal

import torch

import coalign

from ..command import run_command

__all__ = ["build_index", "search", "index_command", "search_command"]

_INDEX_EPILOG = """\
The index folder holds index.json (the model, the image folder, skipped files), paths.json and
shards/*.safetensors. A killed run loses at most one shard: run the same command again to finish it;
run it again later to add images new to the folder. Unreadable images are skipped and listed.

examples:
  coalign index --model runs/finetune/model --images ~/photos --output ~/photos.index
  coalign index --model owner/coalign-cirr --images shop/ --output shop.index --device cuda --batch_size 128
"""

_SEARCH_EPILOG = """\
Prints the ranked image paths with their scores; --output also draws the query and its results.
The model defaults to the one recorded in the index; another model is refused (its embeddings differ).

examples:
  coalign search --index ~/photos.index --image ~/photos/beach.jpg --text "the same beach at sunset" --top_k 5
  coalign search --index shop.index --image dress.jpg --text "in red, sleeveless" --output results.png
"""


def _load_model(spec: str, device: str | None, command: str):
    """:func:`coalign.factory.load_model` on ``device`` (default: cuda when available), in eval mode.

    A registered name gets its published weights when it has them, else a seeded random initialisation (the same
    model in ``index`` and ``search``); that warning is printed as a one-line note.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = coalign.load_model(spec, random_init=None, device=device)
    for w in caught:
        print(f"coalign {command}: note: {w.message}", file=sys.stderr)
    return model.eval()


def build_index(
    model: str,
    images: Path,
    output: Path,
    batch_size: int = 32,
    num_workers: int = 2,
    shard_size: int = 1024,
    dtype: Literal["float32", "float16"] = "float32",
    device: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    approximate: Literal["hnsw", "ivfpq"] | None = None,
) -> int:
    """Encode every image of a folder (recursively) once, for `coalign search`.

    Args:
        model: a registered model name (see `python -c 'import coalign; print(coalign.list_models())'`), a folder
            written by save_pretrained (e.g. runs/x/model), a Lightning .ckpt file or a Hub id (owner/name).
        images: the folder of images to index.
        output: the index folder to write (or to resume).
        batch_size: images per forward pass.
        num_workers: image loading processes.
        shard_size: images per shard file (the work a killed run can lose).
        dtype: storage dtype (float16 halves the index).
        device: cpu, cuda, cuda:1, ... (default: cuda when available).
        overwrite: replace an index of another model or folder.
        progress: show a progress bar.
        approximate: also build an approximate FAISS index for collections beyond a few million vectors (needs
            faiss): hnsw (graph; M 32, efSearch 128) or ivfpq (nlist 4*sqrt(vectors), nprobe 32, m dim/4); saved
            as faiss.index, used by `coalign search`, its candidates re-scored exactly. Default: exact search.
    """
    encoder = _load_model(model, device, "index")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="skipped .* unreadable")  # reported below, with the list
        built = coalign.Index.build(
            encoder,
            images,
            output,
            # a folder is recorded absolute, so that `coalign search` finds it from any working directory
            model_name=str(Path(model).resolve()) if Path(model).exists() else model,
            batch_size=batch_size,
            num_workers=num_workers,
            shard_size=shard_size,
            dtype=getattr(torch, dtype),
            overwrite=overwrite,
            progress=progress,
            approximate=approximate,
        )
    kind = f", approximate index {approximate} ({built.approximate['vectors']:,} vectors)" if approximate else ""
    print(f"indexed {len(built)} images of {built.root} into {built.directory}{kind}")
    if built.skipped:
        print(f"warning: skipped {len(built.skipped)} unreadable image(s) (listed in index.json):", file=sys.stderr)
        for entry in built.skipped[:5]:
            print(f"  {entry['path']}: {entry['error']}", file=sys.stderr)
    return 0


def search(
    index: Path,
    image: Path,
    text: str,
    top_k: int = 10,
    model: str | None = None,
    output: Path | None = None,
    backend: Literal["auto", "faiss", "torch"] = "auto",
    keep_query: bool = False,
    device: str | None = None,
) -> int:
    """Find the indexed images that match a reference image changed as a text says.

    Args:
        index: an index folder written by `coalign index`.
        image: the reference image.
        text: the modification text, e.g. "the same shoe in black".
        top_k: number of results (also -k).
        model: default: the model recorded in the index; otherwise a registered model name, a save_pretrained
            folder, a Lightning .ckpt file or a Hub id (owner/name).
        output: write a picture of the query and its results (PNG).
        backend: auto (the index's approximate FAISS index if it was built with one; else exact, with FAISS if
            installed and the model runs on the CPU), faiss or torch (both exact).
        keep_query: keep the query image in the results if it is indexed.
        device: cpu, cuda, ... (default: cuda when available).
    """
    opened = coalign.Index.load(index)
    spec = model or opened.model_name
    if not spec:
        raise ValueError("the index records no model name; pass --model")
    encoder = _load_model(spec, device, "search")
    results = opened.search(encoder, image, text, k=top_k, backend=backend, exclude_query=not keep_query)
    print(f'{image} + "{text}"  ({len(opened)} images, model {spec})')
    width = len(str(len(results)))
    for rank, (path, score) in enumerate(results, 1):
        print(f"{rank:>{width}}  {score:7.4f}  {path}")
    if output:
        coalign.index.draw_results(image, text, results, output)
        print(f"wrote {output}")
    return 0


def index_command(argv: list[str]) -> int:
    """``coalign index --model M --images FOLDER --output INDEX_DIR``; returns the exit code."""
    return run_command(build_index, argv, prog="coalign index", epilog=_INDEX_EPILOG)


def search_command(argv: list[str]) -> int:
    """``coalign search --index DIR --image QUERY --text "..." [--top_k 10] [--output results.png]``."""
    argv = ["--top_k" if arg == "-k" else arg for arg in argv]  # the short flag of the argparse version
    return run_command(search, argv, prog="coalign search", epilog=_SEARCH_EPILOG)
