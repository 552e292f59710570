"""Stage 4, assemble: kept pairs become triplets in both directions, with groups, a split, a card and a preview.

The dataset folder is ``OUT`` itself (the stage folders beside it are never uploaded):

* ``triplets.jsonl``: one object per triplet (format below), forward then backward, in id order.
* ``images/<shard>/<id>_ref.png`` and ``<id>_tgt.png``: the kept pairs only, hard-linked from ``render/images``
  (no extra disk; copied when the file system refuses links). Images of pairs no longer kept are removed.
* ``stats.json`` and ``README.md`` (the dataset card), ``preview.png`` (a grid of sample triplets).

A triplet object: ``id`` (``<quadruple id>-f`` or ``-b``), ``reference`` and ``target`` (image paths relative
to the folder), ``text`` (modification text), ``group`` (int: the quadruple index, shared by its two triplets),
``split`` (``train``/``val``), ``direction`` (``forward``/``backward``), ``reference_caption``,
``target_caption``, ``domain``, ``edit_type``.

The split is by group, so both directions of a quadruple land on the same side: groups are ordered by a hash of
``(seed, index)`` and the first ``round(val_fraction * groups)`` go to ``val`` (at least one when
``val_fraction > 0`` and there are two groups or more).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from coalign.io import atomic_path, write_jsonl

from ._io import derive_seed, item_path
from .card import dataset_stats, draw_preview, write_card
from .config import SynthesisConfig
from .filter import PairFilter, decide, load_scores
from .prompts import load_quadruples
from .render import load_renders

__all__ = ["assemble", "push_to_hub", "DATASET_FILES"]

#: What ``push_to_hub`` uploads from ``OUT``: the dataset, never the intermediate stage folders.
DATASET_FILES = ["triplets.jsonl", "README.md", "stats.json", "preview.png", "images/**"]


def _link_or_copy(src: Path, dst: Path) -> None:
    if dst.is_file() and os.path.samefile(src, dst):
        return
    with atomic_path(dst) as tmp:
        tmp.unlink()  # atomic_path reserved the name with an empty file; os.link needs it free
        try:
            os.link(src, tmp)
        except OSError:  # another file system, or one without hard links
            shutil.copyfile(src, tmp)


def _split(config: SynthesisConfig, indices: Sequence[int]) -> set[int]:
    order = sorted(indices, key=lambda i: derive_seed(config.seed, "split", i))
    n_val = round(config.assemble.val_fraction * len(order))
    if config.assemble.val_fraction > 0 and len(order) >= 2:
        n_val = min(max(n_val, 1), len(order) - 1)
    return set(order[:n_val])


def _triplets(quad: dict[str, Any], split: str, ref: str, tgt: str) -> list[dict[str, Any]]:
    meta = {"group": quad["index"], "split": split, "domain": quad["domain"], "edit_type": quad["edit_type"]}
    forward = {
        "id": f"{quad['id']}-f",
        "reference": ref,
        "target": tgt,
        "text": quad["forward"],
        "direction": "forward",
        "reference_caption": quad["reference_caption"],
        "target_caption": quad["target_caption"],
        **meta,
    }
    backward = {
        "id": f"{quad['id']}-b",
        "reference": tgt,
        "target": ref,
        "text": quad["backward"],
        "direction": "backward",
        "reference_caption": quad["target_caption"],
        "target_caption": quad["reference_caption"],
        **meta,
    }
    return [forward, backward]


def assemble(
    config: SynthesisConfig, out: Path, filters: Sequence[PairFilter], cache: dict | None = None
) -> dict[str, Any]:
    """Write the dataset folder from the kept pairs; returns the statistics (also in ``stats.json``).

    ``cache``: the filter scores this process already holds (see :class:`.filter.FilterStage`).
    """
    out = Path(out)
    quads = load_quadruples(out)
    renders = load_renders(out, [q["index"] for q in quads], config.shard_size)
    kept = [
        q
        for q in quads
        if q["index"] in renders and decide(filters, load_scores(out, q["index"], config.shard_size))[0] == "kept"
    ]
    val = _split(config, [q["index"] for q in kept])
    triplets, expected = [], set()
    for q in kept:
        paths = []
        for key, suffix in (("reference", "ref"), ("target", "tgt")):
            dst = item_path(out / "images", q["index"], config.shard_size, f"_{suffix}.png")
            src = out / renders[q["index"]][key]
            if config.assemble.link_images:
                _link_or_copy(src, dst)
                paths.append(str(dst.relative_to(out)))
            else:
                paths.append(str(src.relative_to(out)))
            expected.add(dst)
        triplets.extend(_triplets(q, "val" if q["index"] in val else "train", *paths))
    if (out / "images").is_dir():  # pairs a changed threshold no longer keeps must leave the dataset too
        for stale in [p for p in (out / "images").glob("*/*.png") if p not in expected]:
            stale.unlink()
    write_jsonl(out / "triplets.jsonl", triplets)
    stats = dataset_stats(config, out, quads, renders, kept, triplets)
    write_card(out, config, stats)
    draw_preview(out, triplets, config.assemble.preview_triplets, config.seed)
    return stats


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload CIRHS-style synthetic triplets",
) -> str:
    """Upload the dataset in ``folder`` (written by :func:`assemble`) to a Hugging Face dataset repository.

    Only :data:`DATASET_FILES` are uploaded. For hundreds of thousands of images, prefer
    ``huggingface-cli upload-large-folder`` with the same patterns: it resumes an interrupted upload.

    Returns:
        The URL of the commit.
    """
    from huggingface_hub import HfApi  # the Hub client is needed by a push only

    folder = Path(folder)
    if not (folder / "triplets.jsonl").is_file():
        raise FileNotFoundError(f"{folder} has no triplets.jsonl: run the assemble stage before pushing")
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    info = api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type="dataset",
        allow_patterns=DATASET_FILES,
        commit_message=commit_message,
    )
    return str(getattr(info, "commit_url", info))
