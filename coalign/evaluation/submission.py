"""Rankings in the official upload formats, and a checker that judges a file as the test servers do.

Formats (one JSON object per file):

* CIRR: ``{"version": "rc2", "metric": "recall", "<pairid>": [top-50 names]}`` and the same with
  ``"metric": "recall_subset"`` and the top 3 of the image set; every pairid present, reference excluded,
  at most 5 MB.
* CIRCO: ``{"<query id>": [50 unique int image ids]}`` for every query; one duplicate rejects the file.
* FashionIQ (no server; the same shape for other tools): ``{"<index in cap.<cat>.<split>.json>": [top-50 names]}``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

__all__ = [
    "MAX_BYTES",
    "cirr_ranking_files",
    "circo_ranking_files",
    "fashioniq_ranking_files",
    "check_submission",
    "check_cirr",
    "check_circo",
]

#: the servers' size limit ("Maximum 5MB"); the decimal reading is the stricter one
MAX_BYTES = 5_000_000
LIST_LENGTH = 50


def _ranking_of(rankings: dict[int, list[str]], query: dict[str, Any]) -> list[str]:
    try:
        return rankings[query["index"]]
    except KeyError:
        raise ValueError(
            f"no ranking for query {query['index']}: the evaluation did not see every query of the split"
        ) from None


def fashioniq_ranking_files(data, rankings: dict[int, list[str]]) -> dict[str, dict]:
    """``fashioniq_<category>_<split>.json``: caption-file index -> top-50 names, one file per category."""
    files: dict[str, dict] = {f"fashioniq_{cat}_{data.split}.json": {} for cat in data.subsets}
    for q in data.queries:
        files[f"fashioniq_{q['category']}_{data.split}.json"][str(q["caption_index"])] = _ranking_of(rankings, q)[:50]
    return files


def cirr_ranking_files(data, rankings: dict[int, list[str]], subset_rankings: dict[int, list[str]]) -> dict[str, dict]:
    """``cirr_<split>_recall.json`` (top 50) and ``cirr_<split>_recall_subset.json`` (top 3 of the set)."""
    recall: dict[str, Any] = {"version": "rc2", "metric": "recall"}
    subset: dict[str, Any] = {"version": "rc2", "metric": "recall_subset"}
    for q in data.queries:
        recall[str(q["pairid"])] = _ranking_of(rankings, q)[:50]
        subset[str(q["pairid"])] = _ranking_of(subset_rankings, q)[:3]
    return {f"cirr_{data.split}_recall.json": recall, f"cirr_{data.split}_recall_subset.json": subset}


def circo_ranking_files(data, rankings: dict[int, list[str]]) -> dict[str, dict]:
    """``circo_<split>.json``: query id -> 50 int image ids."""
    return {
        f"circo_{data.split}.json": {
            str(q["query_id"]): [int(i) for i in _ranking_of(rankings, q)[:50]] for q in data.queries
        }
    }


class _Report:
    """Problems grouped by kind, so a file with 4,000 bad entries gives a readable report."""

    def __init__(self) -> None:
        self.by_kind: dict[str, list[str]] = defaultdict(list)

    def add(self, kind: str, detail: str = "") -> None:
        self.by_kind[kind].append(detail)

    def lines(self, examples: int = 5) -> list[str]:
        out = []
        for kind, details in self.by_kind.items():
            shown = [d for d in details if d][:examples]
            more = f" (e.g. {'; '.join(shown)}{' ...' if len(details) > len(shown) else ''})" if shown else ""
            out.append(f"{kind}: {len(details)}{more}")
        return out


def _check_list(report: _Report, key: str, value: Any, length: int, allowed, kind_of_item: type) -> list | None:
    if not isinstance(value, list):
        report.add("value is not a list", f"{key}: {type(value).__name__}")
        return None
    if len(value) != length:
        report.add(f"list length is not {length}", f"{key}: {len(value)}")
    bad_type = [v for v in value if not isinstance(v, kind_of_item) or isinstance(v, bool)]
    if bad_type:
        report.add(f"entries that are not {kind_of_item.__name__}", f"{key}: {bad_type[0]!r}")
        return None
    if len(set(value)) != len(value):
        dup = next(v for i, v in enumerate(value) if v in value[:i])
        report.add("duplicate entries in a list", f"{key}: {dup!r}")
    outside = [v for v in value if v not in allowed]
    if outside:
        report.add(
            "names not in the gallery" if kind_of_item is str else "ids not in the gallery", f"{key}: {outside[0]!r}"
        )
    return value


def check_cirr(obj: Any, data, size: int = 0) -> list[str]:
    """Problems of a CIRR upload (``recall`` or ``recall_subset``) for the split ``data``; empty = accepted."""
    report = _Report()
    if size > MAX_BYTES:
        report.add(f"file larger than {MAX_BYTES} bytes", str(size))
    if not isinstance(obj, dict):
        return [f"the file must hold one JSON object, got {type(obj).__name__}"]
    if obj.get("version") != "rc2":
        report.add('"version" is not "rc2"', repr(obj.get("version")))
    metric = obj.get("metric")
    if metric not in ("recall", "recall_subset"):
        report.add('"metric" is not "recall" or "recall_subset"', repr(metric))
    gallery = set(data.gallery_ids)
    queries = {str(q["pairid"]): q for q in data.queries}
    for key in obj.keys() - queries.keys() - {"version", "metric"}:
        report.add(f"pairids not in {data.split}", key)
    for key, q in queries.items():
        if key not in obj:
            report.add("missing pairids", key)
            continue
        ref = q["reference_id"]
        if metric == "recall_subset":
            members = [m for m in q["subset_members"] if m != ref]
            value = _check_list(report, key, obj[key], min(3, len(members)), set(members) | {ref}, str)
            if value is not None and any(v not in members and v != ref for v in value):
                report.add("subset entries outside the query's image set", key)
        else:
            value = _check_list(report, key, obj[key], min(LIST_LENGTH, len(gallery) - 1), gallery, str)
        if value is not None and ref in value:
            report.add("reference image not excluded", key)
    return report.lines()


def check_circo(obj: Any, data, size: int = 0) -> list[str]:
    """Problems of a CIRCO upload for the split ``data``; empty = accepted."""
    report = _Report()
    if size > MAX_BYTES:
        report.add(f"file larger than {MAX_BYTES} bytes", str(size))
    if not isinstance(obj, dict):
        return [f"the file must hold one JSON object, got {type(obj).__name__}"]
    gallery = {int(i) for i in data.gallery_ids}
    queries = {str(q["query_id"]) for q in data.queries}
    for key in obj.keys() - queries:
        report.add(f"query ids not in {data.split}", key)
    for key in sorted(queries, key=int):
        if key not in obj:
            report.add("missing query ids", key)
        else:
            _check_list(report, key, obj[key], min(LIST_LENGTH, len(gallery)), gallery, int)
    return report.lines()


def check_submission(path: str | Path, benchmark: str, root: str | Path, split: str) -> list[str]:
    """Read an upload file and return every problem found (grouped by kind); an empty list means it passes."""
    from coalign.datamodules import CIRCODataModule, CIRRDataModule

    modules = {"cirr": CIRRDataModule, "circo": CIRCODataModule}
    if benchmark not in modules:
        raise ValueError(f"no test server checks {benchmark!r} files; valid benchmarks: {', '.join(modules)}")
    data = modules[benchmark](root).split_data(split)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"submission file not found: {path}")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return [f"{path} is not valid JSON: {err}"]
    check = check_cirr if benchmark == "cirr" else check_circo
    return check(obj, data, size=path.stat().st_size)
