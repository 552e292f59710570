"""Stage 4, assemble: each group's kept members become triplets under one group id, with a split, card and preview.

The dataset folder is ``OUT`` itself (the stage folders beside it are never uploaded):

* ``triplets.jsonl``: one object per triplet (format below), group by group in id order.
* ``images/<shard>/<id>_p<k>.png``: the kept panels only (the source and the kept edits), hard-linked from
  ``render/images`` (no extra disk; copied when the file system refuses links). Panels no longer kept are removed.
* ``data/<split>-<k>-of-<n>.parquet``: the same dataset in the Hub's format, one row per group with its kept
  panels embedded (:mod:`.hub_format`), what ``datasets.load_dataset(OUT)`` and the Hub's viewer read and what
  :func:`push_to_hub` uploads. Needs ``datasets`` (``pip install "coalign[hub]"``); without it the shards are
  skipped with a warning and the loose files above remain.
* ``stats.json`` and ``README.md`` (the dataset card), ``preview.png`` (groups: panels, captions, filter scores).

**Reorganisation** (:func:`group_triplets`). Panel 0 is the source, panel ``k`` is edit ``k - 1``. For every kept
edit, in order: source -> edit with its ``forward`` text, then edit -> source with its ``backward`` text; then, in
the group's order, edit ``i`` -> edit ``j`` for every ``cross`` text whose two edits were both kept. All of them
share ``group`` (the group index, unique per group), so a batch holding several of them gives each query the
other targets of its group as soft positives.

A triplet object: ``id`` (``<group id>-<reference panel>-<target panel>``), ``reference`` and ``target`` (image
paths relative to the folder), ``reference_id`` and ``target_id`` (image ids: the same paths, so that training can
tell a query's own reference image among the group's targets), ``text`` (modification text), ``group`` (int),
``split`` (``train``/``val``), ``direction`` (``forward`` source -> edit, ``backward`` edit -> source, ``cross``
edit -> edit), ``reference_caption``, ``target_caption``, ``domain``, ``edit_type``.

The split is by group, never splitting one: groups are ordered by a hash of ``(seed, index)`` and the first
``round(val_fraction * groups)`` go to ``val`` (at least one when ``val_fraction > 0`` and there are two groups or
more).
"""

from __future__ import annotations

import importlib.util
import logging
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
from .groups import group_captions
from .hub_format import HubRow, group_row, write_parquet_shards
from .prompts import load_groups
from .render import load_renders

__all__ = ["assemble", "group_triplets", "push_to_hub", "DATASET_FILES"]

#: What ``push_to_hub`` uploads from ``OUT``: the parquet shards and the card, never the loose ``images/`` and
#: ``triplets.jsonl`` (the same data, for local training) nor the intermediate stage folders.
DATASET_FILES = ["data/*.parquet", "README.md", "stats.json", "preview.png"]

log = logging.getLogger("coalign.synthesis")


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


def group_triplets(
    group: dict[str, Any], kept: Sequence[int], paths: Sequence[str], split: str
) -> list[dict[str, Any]]:
    """The triplets of one group (see the module docstring for the order).

    Args:
        group: a line of ``prompts/groups.jsonl``.
        kept: positions in ``group["edits"]`` of the kept edits.
        paths: image path of every panel (index 0 the source), relative to the dataset folder.
        split: ``train`` or ``val``.
    """
    captions = group_captions(group)
    kept = sorted(set(kept))

    def triplet(a: int, b: int, text: str, direction: str) -> dict[str, Any]:
        return {
            "id": f"{group['id']}-{a}-{b}",
            "reference": paths[a],
            "target": paths[b],
            "reference_id": paths[a],
            "target_id": paths[b],
            "text": text,
            "group": group["index"],
            "split": split,
            "direction": direction,
            "reference_caption": captions[a],
            "target_caption": captions[b],
            "domain": group["domain"],
            "edit_type": group["edit_type"],
        }

    out = []
    for k in kept:
        out.append(triplet(0, k + 1, group["edits"][k]["forward"], "forward"))
        out.append(triplet(k + 1, 0, group["edits"][k]["backward"], "backward"))
    for cross in group.get("cross", []):
        if cross["from"] in kept and cross["to"] in kept:
            out.append(triplet(cross["from"] + 1, cross["to"] + 1, cross["text"], "cross"))
    return out


def assemble(config: SynthesisConfig, out: Path, filters: Sequence[PairFilter]) -> dict[str, Any]:
    """Write the dataset folder from the kept members of every group; returns the statistics (``stats.json``)."""
    out = Path(out)
    groups = load_groups(out)
    renders = load_renders(out, [g["index"] for g in groups], config.shard_size)
    kept: dict[int, list[int]] = {}  # group index -> kept edit positions, for groups that keep any
    decisions: dict[int, list[tuple[str, str | None]]] = {}
    scores: dict[int, list[dict[str, Any]]] = {}
    for g in groups:
        if g["index"] not in renders:
            continue
        scores[g["index"]] = members = load_scores(out, g["index"], config.shard_size)
        decisions[g["index"]] = [decide(filters, m) for m in members]
        if len(members) == len(g["edits"]) and all(d != "pending" for d, _ in decisions[g["index"]]):
            if positions := [k for k, (d, _) in enumerate(decisions[g["index"]]) if d == "kept"]:
                kept[g["index"]] = positions
    val = _split(config, sorted(kept))
    triplets, expected = [], set()
    rows: dict[str, list[HubRow]] = {"train": [], "val": []}
    for g in groups:
        if g["index"] not in kept:
            continue
        paths, panels = [], []
        for panel, src in enumerate(renders[g["index"]]["panels"]):
            dst = item_path(out / "images", g["index"], config.shard_size, f"_p{panel}.png")
            if panel == 0 or panel - 1 in kept[g["index"]]:
                if config.assemble.link_images:
                    _link_or_copy(out / src, dst)
                expected.add(dst)
                panels.append(panel)
            paths.append(str(dst.relative_to(out)) if config.assemble.link_images else src)
        split = "val" if g["index"] in val else "train"
        group = group_triplets(g, kept[g["index"]], paths, split)
        triplets.extend(group)
        files = [out / renders[g["index"]]["panels"][p] for p in panels]
        rows[split].append(group_row(g, panels, files, [paths[p] for p in panels], group))
    if (out / "images").is_dir():  # panels a changed threshold no longer keeps must leave the dataset too
        for stale in [p for p in (out / "images").glob("*/*.png") if p not in expected]:
            stale.unlink()
    write_jsonl(out / "triplets.jsonl", triplets)
    shards = None
    if importlib.util.find_spec("datasets") is not None:
        shards = write_parquet_shards(out, rows, config.assemble.parquet_shard_mb)
    else:
        log.warning(
            "assemble: `datasets` is not installed, so %s/data/*.parquet (the Hub's format) was not written; "
            'pip install "coalign[hub]" and rerun with --stage assemble',
            out,
        )
    stats = dataset_stats(config, out, groups, renders, kept, triplets)
    write_card(out, config, stats, shards)
    rows = _preview_rows(groups, renders, decisions, scores, config.assemble.preview_groups, config.seed)
    draw_preview(out, rows)
    return stats


def _panel(
    path: str, caption: str, text: str | None, decision: tuple[str, str | None], scores: dict[str, Any]
) -> dict[str, Any]:
    status, by = decision
    return {"path": path, "caption": caption, "text": text, "status": status, "by": by, "scores": scores}


def _preview_rows(groups, renders, decisions, scores, count: int, seed: int) -> list[dict[str, Any]]:
    """The rows of ``preview.png`` (schema: :func:`.card.draw_preview`): up to ``count`` scored groups, seeded,
    one with a rejected member first if any; then up to ``max(1, count // 2)`` (at most 4) rejected pairs of
    other groups, taking the filters that rejected them in turn so that every reason shows."""
    scored = [g for g in groups if g["index"] in decisions and len(decisions[g["index"]]) == len(g["edits"])]
    order = sorted(scored, key=lambda g: derive_seed(seed, "preview", g["index"]))
    mixed = [g for g in order if {d for d, _ in decisions[g["index"]]} >= {"kept", "rejected"}]
    chosen = (mixed[:1] + [g for g in order if g not in mixed[:1]])[: max(count, 0)]

    def panels(g: dict[str, Any], members: Sequence[int]) -> list[dict[str, Any]]:
        i, captions = g["index"], group_captions(g)
        record = renders[i]["panels"]
        out = [_panel(record[0], captions[0], None, ("source", None), {})]
        for k in members:
            out.append(_panel(record[k + 1], captions[k + 1], g["edits"][k]["forward"], decisions[i][k], scores[i][k]))
        return out

    def row(kind: str, g: dict[str, Any], members: Sequence[int]) -> dict[str, Any]:
        return {
            "kind": kind,
            "id": g["id"],
            "domain": g["domain"],
            "edit_type": g["edit_type"],
            "panels": panels(g, members),
        }

    rows = [row("group", g, range(len(g["edits"]))) for g in chosen]
    if count <= 0:
        return rows
    shown = {g["index"] for g in chosen}
    by_filter: dict[str, list[tuple[int, int, dict[str, Any], int]]] = {}
    for g in order:
        for k, (status, by) in enumerate(decisions[g["index"]]):
            if status == "rejected":
                key = derive_seed(seed, "preview-rejected", g["index"], k)
                by_filter.setdefault(str(by), []).append((int(g["index"] in shown), key, g, k))
    for pairs in by_filter.values():  # pairs of groups not shown above first, then in seeded order
        pairs.sort(key=lambda p: p[:2])
    picked = []
    for turn in range(max(len(p) for p in by_filter.values()) if by_filter else 0):
        picked += [pairs[turn] for _, pairs in sorted(by_filter.items()) if turn < len(pairs)]
    for _, _, g, k in picked[: min(4, max(1, count // 2))]:
        rows.append(row("rejected", g, [k]))
    return rows


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload CIRHS-style synthetic triplets",
) -> str:
    """Upload the dataset in ``folder`` (written by :func:`assemble`) to a Hugging Face dataset repository.

    Only :data:`DATASET_FILES` are uploaded: the parquet shards of ``data/`` (the card's ``configs:`` names
    them, so ``datasets.load_dataset(repo_id)`` and the dataset viewer read them), ``README.md``, ``stats.json``
    and ``preview.png``. For hundreds of gigabytes, prefer ``hf upload-large-folder`` with the same patterns: it
    resumes an interrupted upload.

    Returns:
        The URL of the commit.
    """
    from huggingface_hub import HfApi  # the Hub client is needed by a push only

    folder = Path(folder)
    if not (folder / "triplets.jsonl").is_file():
        raise FileNotFoundError(f"{folder} has no triplets.jsonl: run the assemble stage before pushing")
    if not any((folder / "data").glob("*.parquet")):
        raise FileNotFoundError(
            f'{folder}/data has no parquet shards, the format pushed to the Hub: pip install "coalign[hub]" '
            "and rerun with --stage assemble before pushing"
        )
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
