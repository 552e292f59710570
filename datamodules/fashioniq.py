"""FashionIQ (Wu et al., 2021): annotation parser, DataModule, evaluator and ranking-file writer.

Dress, shirt and toptee, read from the official layout::

    ROOT/captions/cap.{dress,shirt,toptee}.{train,val,test}.json     [{"target", "candidate", "captions": [c0, c1]}]
    ROOT/image_splits/split.{dress,shirt,toptee}.{train,val,test}.json   ["<ASIN>", ...]
    ROOT/images/<ASIN>.png  (or .jpg: resolved per dataset)

Each category is evaluated on its own gallery, ``split.<category>.<split>.json`` (the CLIP4Cir / SPRC
convention), never on a folder listing; queries of several categories share one loader and are ranked within
their category. The test captions have no targets: that split yields rankings, no metrics.

Metrics (percentages): Recall@10/50 per category on the category's own gallery, their means over categories,
and ``fashioniq/avg = (avg R@10 + avg R@50) / 2``.

Ranking files (no test server; the same shape for other tools): ``fashioniq_<category>_<split>.json``, one JSON
object ``{"<index in cap.<category>.<split>.json>": [top-50 names]}`` per category.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from coalign.evaluation.evaluator import RetrievalEvaluator
from coalign.evaluation.ranks import compact, head, lookup_positions
from coalign.evaluation.submission import ranking_of

from .benchmark import BenchmarkDataModule, SplitData, read_annotation, require

__all__ = [
    "FashionIQDataModule",
    "FashionIQEvaluator",
    "fashioniq_ranking_files",
    "join_captions",
    "CATEGORIES",
    "CAPTION_JOINS",
]

CATEGORIES = ("dress", "shirt", "toptee")
CAPTION_JOINS = ("clip4cir", "reversed", "lowercase", "both_orders")


def _clean(caption: str) -> str:
    return caption.strip(".?, ")


def join_captions(captions: Sequence[str], how: str = "clip4cir") -> str:
    """One query text from a FashionIQ caption pair, exactly as the peers build it.

    ``clip4cir``: ``f"{c0.strip('.?, ').capitalize()} and {c1.strip('.?, ')}"`` (CLIP4Cir, SPRC, SEARLE), taken
    literally: a blank caption stays blank, so ``["is red", ""]`` gives ``"Is red and "`` and two blank captions
    give ``" and "`` (the query is still ranked, as the peers rank it; it never stops a run).
    ``reversed``: the same with c1 first; ``lowercase``: ``f"{c0} and {c1}"`` stripped and lower-cased.
    (``both_orders`` encodes ``clip4cir`` and ``reversed`` and averages: see the DataModule.)
    """
    if how not in CAPTION_JOINS:
        raise ValueError(f"unknown caption join {how!r}; choose one of {', '.join(CAPTION_JOINS)}")
    first, second = (list(captions) + ["", ""])[:2]
    if how == "reversed":
        first, second = second, first
    if how == "lowercase":
        return f"{_clean(first)} and {_clean(second)}".lower()
    return f"{_clean(first).capitalize()} and {_clean(second)}"


def random_caption_join(captions: Sequence[str], rng=random) -> str:
    """CLIP4Cir's training text: "c0 and c1", "c1 and c0", "c0" or "c1", each with probability 1/4."""
    parts = [_clean(c) for c in captions if _clean(c)]
    if len(parts) < 2:
        return parts[0].capitalize() if parts else ""
    choice = rng.randrange(4)
    a, b = parts[:2] if choice in (0, 2) else parts[1::-1]
    return f"{a.capitalize()} and {b}" if choice < 2 else a.capitalize()


# -- evaluation ------------------------------------------------------------------------------------------------
class FashionIQEvaluator(RetrievalEvaluator):
    """FashionIQ Recall@10/50, each query ranked within its own category's gallery.

    Args:
        gallery_ids: union of the category galleries (the gallery loader's order).
        category_galleries: category -> names of its gallery.
        exclude_reference: remove the reference image from the ranking (off in the CLIP4Cir convention).
        has_labels: False for the test split.
        query_text_keys: ``("text",)``, or ``("text", "text_reversed")`` for ``caption_join="both_orders"``.
    """

    value_names = ("R@10", "R@50")

    def __init__(
        self,
        gallery_ids: Sequence[str],
        category_galleries: dict[str, Sequence[str]],
        *,
        exclude_reference: bool = False,
        has_labels: bool = True,
        query_text_keys: Sequence[str] = ("text",),
    ) -> None:
        n = len(gallery_ids)
        membership = torch.zeros(len(category_galleries), n, dtype=torch.bool)
        position = {str(name): i for i, name in enumerate(gallery_ids)}
        for c, names in enumerate(category_galleries.values()):
            membership[c, [position[str(name)] for name in names]] = True
        # a category ranked inside a larger union gallery needs the full ranking to find its own top 50 exactly
        whole = bool(membership.all())
        super().__init__(
            gallery_ids,
            top_k=self.list_length if whole else n,
            exclude_reference=exclude_reference,
            has_labels=has_labels,
            query_text_keys=query_text_keys,
        )
        self.categories = list(category_galleries)
        self.register_buffer("membership", membership, persistent=False)
        self.add_state("category", default=[], dist_reduce_fx="cat")

    def _update(self, batch: dict[str, Any], positions: Tensor) -> None:
        try:
            category = torch.tensor([self.categories.index(c) for c in batch["category"]], device=self.device)
        except ValueError as err:
            raise ValueError(f"query category not among {self.categories}: {err}") from None
        allowed = self.membership[category].gather(1, positions.clamp(min=0)) & (positions >= 0)
        ranking = head(compact(positions, allowed), self.list_length)
        self.ranking.append(ranking)
        self.category.append(category)
        if self.has_labels:
            target = lookup_positions(batch["target_id"], self.position, self.device, missing=-2)
            hits = ranking == target[:, None]
            self.values.append(torch.stack([hits[:, :10].any(1), hits[:, :50].any(1)], dim=1).float())

    def _metric_states(self) -> tuple[str, ...]:
        return ("values", "category")

    def _metrics(self, states: dict[str, Tensor]) -> dict[str, float]:
        out: dict[str, float] = {}
        per_category = []
        for c, name in enumerate(self.categories):
            rows = states["values"][states["category"] == c]
            if len(rows):
                r10, r50 = (rows.mean(dim=0) * 100).tolist()
                out[f"fashioniq/{name}/R@10"], out[f"fashioniq/{name}/R@50"] = r10, r50
                per_category.append((r10, r50))
        if per_category:
            avg10 = sum(r[0] for r in per_category) / len(per_category)
            avg50 = sum(r[1] for r in per_category) / len(per_category)
            out.update({"fashioniq/avg/R@10": avg10, "fashioniq/avg/R@50": avg50, "fashioniq/avg": (avg10 + avg50) / 2})
        return out


# -- upload files ----------------------------------------------------------------------------------------------
def fashioniq_ranking_files(data: SplitData, rankings: dict[int, list[str]]) -> dict[str, dict]:
    """``fashioniq_<category>_<split>.json``: caption-file index -> top-50 names, one file per category."""
    files: dict[str, dict] = {f"fashioniq_{cat}_{data.split}.json": {} for cat in data.subsets}
    for q in data.queries:
        files[f"fashioniq_{q['category']}_{data.split}.json"][str(q["caption_index"])] = ranking_of(rankings, q)[:50]
    return files


# -- data module ----------------------------------------------------------------------------------------------
class FashionIQDataModule(BenchmarkDataModule):
    """FashionIQ train / val / test.

    Args:
        root: folder holding ``captions/``, ``image_splits/`` and ``images/``.
        categories: categories to load and evaluate (default all three); metrics are reported per category
            and averaged over these.
        caption_join: how the two captions become one query at evaluation: ``clip4cir`` (default),
            ``reversed``, ``lowercase``, or ``both_orders`` (encode both orders, average the query features).
            Training always picks CLIP4Cir's random join.
        gallery: ``split`` (default): the category's ``split.<cat>.<split>.json``; ``val_union``: only the
            references and targets of the split's queries (smaller, inflates scores; some papers use it).
        exclude_reference: remove each query's reference image from its ranking (default False, as CLIP4Cir).
        image_extension: ``.png`` or ``.jpg``; None looks at the images folder once and picks the one present.
        batch_size: queries (or images) per batch.
        num_workers: loader worker processes.
        image_transform: PIL -> tensor; None (the default) waits for ``connect(model.preprocess)``.
        skip_bad_images: drop (with a warning) what needs an image that is missing or cannot be decoded,
            instead of stopping before the first step (training split only for a benchmark).
    """

    benchmark = "fashioniq"
    splits = ("train", "val", "test")
    test_split = "test"
    has_test_server = False

    def __init__(
        self,
        root: str | Path,
        categories: Sequence[str] = CATEGORIES,
        caption_join: Literal["clip4cir", "reversed", "lowercase", "both_orders"] = "clip4cir",
        gallery: Literal["split", "val_union"] = "split",
        exclude_reference: bool = False,
        image_extension: str | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        image_transform=None,
        skip_bad_images: bool = False,
    ) -> None:
        super().__init__(
            root,
            batch_size=batch_size,
            num_workers=num_workers,
            image_transform=image_transform,
            skip_bad_images=skip_bad_images,
        )
        categories = [categories] if isinstance(categories, str) else list(categories)
        unknown = [c for c in categories if c not in CATEGORIES]
        if not categories:
            raise ValueError(f"categories must name at least one of {', '.join(CATEGORIES)}")
        if unknown:
            raise ValueError(f"unknown FashionIQ categories {unknown}; choose among {', '.join(CATEGORIES)}")
        if caption_join not in CAPTION_JOINS:
            raise ValueError(f"unknown caption_join {caption_join!r}; choose one of {', '.join(CAPTION_JOINS)}")
        if gallery not in ("split", "val_union"):
            raise ValueError(f"unknown gallery {gallery!r}; choose 'split' or 'val_union'")
        if image_extension is not None and image_extension.lstrip(".") not in ("png", "jpg"):
            raise ValueError(f"image_extension must be .png or .jpg, got {image_extension!r}")
        self.categories = list(dict.fromkeys(categories))
        self.caption_join = caption_join
        self.gallery = gallery
        self.exclude_reference = exclude_reference
        self.image_extension = None if image_extension is None else "." + image_extension.lstrip(".")

    # -- parsing -----------------------------------------------------------------------------------------
    def _resolve_extension(self, names: Sequence[str]) -> str:
        """The extension this copy uses, decided once from a sample of listed names (copies differ)."""
        if self.image_extension is None:
            sample = list(names)[:20]
            counts = {
                ext: sum((self.root / "images" / f"{n}{ext}").is_file() for n in sample) for ext in (".png", ".jpg")
            }
            # with neither present, keep .png so the missing-file check names real candidate paths
            self.image_extension = ".jpg" if counts[".jpg"] > counts[".png"] else ".png"
        return self.image_extension

    def _parse(self, split: str) -> SplitData:
        labelled = split != "test"
        if self.gallery == "val_union" and not labelled:
            raise ValueError("gallery='val_union' is built from query targets, which the test split does not have")
        queries: list[dict[str, Any]] = []
        galleries: dict[str, list[str]] = {}
        raw: dict[str, tuple[Path, list, list]] = {}
        for cat in self.categories:
            cap_path = self.root / "captions" / f"cap.{cat}.{split}.json"
            split_path = self.root / "image_splits" / f"split.{cat}.{split}.json"
            caps = read_annotation(cap_path, "FashionIQ caption file")
            names = read_annotation(split_path, "FashionIQ split file")
            for path, value in ((cap_path, caps), (split_path, names)):
                if not isinstance(value, list):
                    raise ValueError(f"{path} should hold a JSON list, got {type(value).__name__}")
            for i, name in enumerate(names):
                if not isinstance(name, str):
                    raise ValueError(f"{split_path}: entry {i} should be an image name (string), got {name!r:.100}")
            keys: dict[str, Any] = {"candidate": str, "captions": list} | ({"target": str} if labelled else {})
            for i, entry in enumerate(caps):
                require(entry, keys, cap_path, i)
                if not entry["captions"] or not all(isinstance(c, str) for c in entry["captions"]):
                    raise ValueError(f"{cap_path}: entry {i} needs a list of caption strings: {entry!r:.300}")
            raw[cat] = (cap_path, caps, names)
        sample = [n for _, caps, names in raw.values() for n in names[:10] + [e["candidate"] for e in caps[:10]]]
        ext = self._resolve_extension(sample)
        for cat, (_, caps, names) in raw.items():
            if self.gallery == "val_union":
                names = [n for e in caps for n in (e["candidate"], e["target"])]
            galleries[cat] = list(dict.fromkeys(names))
            listed = set(galleries[cat])
            missing_targets = [e["target"] for e in caps if labelled and e["target"] not in listed]
            if missing_targets:
                warnings.warn(
                    f"{len(missing_targets)} {cat} {split} targets are not in the gallery "
                    f"(e.g. {missing_targets[0]}); those queries can never be hit",
                    stacklevel=2,
                )
            for j, entry in enumerate(caps):
                record = {
                    "index": len(queries),
                    "reference": self.root / "images" / f"{entry['candidate']}{ext}",
                    "reference_id": entry["candidate"],
                    "target_id": entry.get("target", "") if labelled else "",
                    "text": join_captions(entry["captions"], self.caption_join),
                    "category": cat,
                    "caption_index": j,
                    "_captions": list(entry["captions"]),
                }
                if self.caption_join == "both_orders":
                    record["text_reversed"] = join_captions(entry["captions"], "reversed")
                queries.append(record)
        gallery_ids = list(dict.fromkeys(n for names in galleries.values() for n in names))
        paths = {n: self.root / "images" / f"{n}{ext}" for n in gallery_ids}
        for q in queries:
            paths[q["reference_id"]] = q["reference"]
            if q["target_id"]:
                paths[q["target_id"]] = self.root / "images" / f"{q['target_id']}{ext}"
        gallery = [(n, paths[n]) for n in gallery_ids]
        return SplitData(split, queries, gallery, has_labels=labelled, paths=paths, subsets=galleries)

    def _train_text(self, record: dict[str, Any], index: int) -> str:
        return random_caption_join(record["_captions"])

    # -- evaluation --------------------------------------------------------------------------------------
    def build_evaluator(self, split: str) -> FashionIQEvaluator:
        data = self.split_data(split)
        keys = ("text", "text_reversed") if self.caption_join == "both_orders" else ("text",)
        return FashionIQEvaluator(
            data.gallery_ids,
            data.subsets,
            exclude_reference=self.exclude_reference,
            has_labels=data.has_labels,
            query_text_keys=keys,
        )

    def protocol(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "categories": ",".join(self.categories),
            "caption_join": self.caption_join,
            "gallery": self.gallery,
            "exclude_reference": self.exclude_reference,
            "image_extension": self.image_extension,
        }

    def ranking_files(self, split: str, evaluator: FashionIQEvaluator) -> dict[str, dict]:
        return fashioniq_ranking_files(self.split_data(split), evaluator.rankings())
