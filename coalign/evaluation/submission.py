"""Benchmark-agnostic pieces of the upload files: limits, the per-query ranking lookup and the checker's parts.

Each benchmark's upload format, its file writer and its checker live with its DataModule
(``coalign.datamodules.cirr``, ``.circo``, ``.fashioniq``); ``BenchmarkDataModule.check_submission`` reads a
file and judges it as the test server does. The pieces they share are here.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection
from typing import Any

__all__ = ["MAX_BYTES", "LIST_LENGTH", "ProblemReport", "check_list", "ranking_of"]

#: the servers' size limit ("Maximum 5MB"); the decimal reading is the stricter one
MAX_BYTES = 5_000_000
#: entries per query in an upload list (the servers score Recall@50 / mAP@50)
LIST_LENGTH = 50


def ranking_of(rankings: dict[int, list[str]], query: dict[str, Any]) -> list[str]:
    """The ranking of ``query`` (a split record with its ``index``) in an evaluator's ``rankings()``."""
    try:
        return rankings[query["index"]]
    except KeyError:
        raise ValueError(
            f"no ranking for query {query['index']}: the evaluation did not see every query of the split"
        ) from None


class ProblemReport:
    """Problems of an upload file grouped by kind, so a file with 4,000 bad entries gives a readable report."""

    def __init__(self) -> None:
        self.by_kind: dict[str, list[str]] = defaultdict(list)

    def add(self, kind: str, detail: str = "") -> None:
        self.by_kind[kind].append(detail)

    def lines(self, examples: int = 5) -> list[str]:
        """One line per kind: ``"<kind>: <count> (e.g. <first examples>)"``; empty when nothing was found."""
        out = []
        for kind, details in self.by_kind.items():
            shown = [d for d in details if d][:examples]
            more = f" (e.g. {'; '.join(shown)}{' ...' if len(details) > len(shown) else ''})" if shown else ""
            out.append(f"{kind}: {len(details)}{more}")
        return out


def check_list(
    report: ProblemReport, key: str, value: Any, length: int, allowed: Collection, kind_of_item: type
) -> list | None:
    """Check one query's upload list: a list of ``length`` unique ``kind_of_item`` entries, all in ``allowed``.

    Problems go to ``report``; returns the list, or None when it is not a list of ``kind_of_item``.
    """
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
