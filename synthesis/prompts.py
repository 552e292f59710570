"""Stage 1, prompts: a chat backend describes one group (a source scene and its edits) per item id.

The answer is the group JSON of :mod:`.backends`, parsed and validated strictly by :func:`.groups.parse_group`.

Artifacts under ``OUT/prompts/``:

* ``items/<shard>/<id>.json``: one record per item: ``status`` (``ok`` or ``malformed``), the seeded ``domain``
  and ``edit_type``, ``attempts``, the validation ``errors`` of rejected answers, and for ``ok`` the
  ``group`` and raw ``answer``. A malformed item has used all its retries: it is final, counted, and
  skipped downstream (re-sampling it would give the same answers, as the seeds derive from its id).
* ``groups.jsonl``: the valid groups, near-duplicates removed, in id order: the input of ``render``; one object
  per group: ``id``, ``index``, ``domain``, ``edit_type``, ``source``, ``edits``, ``cross``.
* ``report.json``: counts (requested, ok, malformed with the most frequent validation errors, duplicates,
  failed, retried).

An item whose LLM call raised has no record (only ``OUT/failures/prompts/<shard>/<id>.json``) and is retried by
the next run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from coalign.io import atomic_write_json, read_json, read_jsonl, write_jsonl

from ._io import derive_seed, existing_items, failed_indices, item_id, item_path
from .backends import ChatBackend
from .config import SynthesisConfig
from .groups import GroupError, conversation, draw, near_duplicates, parse_group
from .hf_backends import chat_backend
from .runner import RunContext, Stage

__all__ = ["PromptsStage", "finalize_prompts", "load_groups"]


class PromptsStage(Stage):
    """Generate, validate and retry groups; see the module docstring for the artifacts.

    Args:
        config: the synthesis config.
        ctx: this rank's context.
        backend: the chat backend (default: built from ``config.prompts``).
    """

    name = "prompts"

    def __init__(self, config: SynthesisConfig, ctx: RunContext, backend: ChatBackend | None = None):
        super().__init__(ctx, config.shard_size)
        self.config = config.prompts
        self.seed = config.seed
        self.batch_size = self.config.batch_size
        self.root = ctx.out / "prompts"
        self.backend = backend if backend is not None else chat_backend(self.config)

    def items(self) -> list[int]:
        return list(range(self.config.num_groups))

    def is_done(self, index: int) -> bool:
        return item_path(self.root / "items", index, self.shard_size).is_file()

    def done_items(self, indices: Sequence[int]) -> set[int]:
        return existing_items(self.root / "items", indices, self.shard_size)

    def setup(self) -> None:
        self.backend.setup(self.ctx.device)

    def teardown(self) -> None:
        self.backend.teardown()

    def process(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        cfg = self.config
        records = {}
        for i in indices:
            d = draw(cfg.taxonomy, self.seed, i)
            records[i] = {
                "id": item_id(i),
                "index": i,
                "status": "malformed",
                "domain": d.domain,
                "edit_type": d.edit_type,
                "attempts": 0,
                "errors": [],
                "conversation": conversation(d, cfg),
            }
        pending = list(indices)
        for attempt in range(cfg.max_retries + 1):
            if not pending:
                break
            # a fresh seed per attempt: the retry is a new sample, and the same one on every rerun
            seeds = [derive_seed(self.seed, "prompts", i, attempt) for i in pending]
            conversations = [records[i]["conversation"] for i in pending]
            answers = self.backend.generate(conversations, seeds, cfg.group_size - 1)
            if len(answers) != len(pending):
                raise RuntimeError(f"the chat backend answered {len(answers)} of {len(pending)} conversations")
            still = []
            for i, answer in zip(pending, answers, strict=True):
                rec = records[i]
                rec["attempts"] = attempt + 1
                try:
                    rec["group"] = parse_group(answer, cfg)
                except GroupError as err:
                    rec["errors"].append(str(err))
                    rec["last_answer"] = answer[:2000]
                    still.append(i)
                else:
                    rec["status"], rec["answer"] = "ok", answer
            pending = still
        for rec in records.values():
            del rec["conversation"]
        return [records[i] for i in indices]

    def write(self, index: int, result: dict[str, Any]) -> None:
        atomic_write_json(item_path(self.root / "items", index, self.shard_size), result)


def finalize_prompts(config: SynthesisConfig, out: Path) -> dict[str, Any]:
    """Merge the item records into ``groups.jsonl`` (dropping near-duplicates) and write ``report.json``.

    Runs on one rank after all ranks finished; it only reads records, so it can be rerun at will.
    """
    root = out / "prompts"
    requested = config.prompts.num_groups
    answered = existing_items(root / "items", range(requested), config.shard_size)
    records = [read_json(item_path(root / "items", i, config.shard_size)) for i in sorted(answered)]
    ok = [r for r in records if r["status"] == "ok"]
    duplicate_of = near_duplicates([r["group"] for r in ok], config.prompts.dedup_threshold)
    groups = [
        {"id": r["id"], "index": r["index"], "domain": r["domain"], "edit_type": r["edit_type"], **r["group"]}
        for pos, r in enumerate(ok)
        if pos not in duplicate_of
    ]
    write_jsonl(root / "groups.jsonl", groups)
    failed = len(failed_indices(out, "prompts") - answered)
    report = {
        "requested": requested,
        "group_size": config.prompts.group_size,
        "answered": len(records),
        "ok": len(ok),
        "malformed": len(records) - len(ok),
        "retried_then_ok": sum(1 for r in ok if r["attempts"] > 1),
        "duplicates": len(duplicate_of),
        "kept": len(groups),
        "failed": failed,
        "missing": requested - len(records),
        "duplicate_examples": [
            [ok[later]["id"], ok[earlier]["id"]] for later, earlier in list(duplicate_of.items())[:20]
        ],
        "malformed_errors": _error_counts(r for r in records if r["status"] != "ok"),
    }
    atomic_write_json(root / "report.json", report)
    return report


def _error_counts(records) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in records:
        for err in r["errors"]:
            kind = err.split(":")[0].split(" has ")[0].split(" is ")[0]
            counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:10])


def load_groups(out: Path) -> list[dict[str, Any]]:
    """The groups the later stages work on, with a clear error when the prompts stage has not finished."""
    path = out / "prompts" / "groups.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run the prompts stage first (--stage prompts)")
    return read_jsonl(path)
