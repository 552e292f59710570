"""`coalign evaluate` end to end on fake benchmarks: metrics.json agrees with the ranking files, the files pass
the server checks, and broken files are caught."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from _eval_fakes import FakeCIRModel
from PIL import Image

from coalign.commands import evaluate as commands
from coalign.commands.evaluate import check_submission_command, evaluate_command

sys.path.insert(0, str(Path(__file__).parent / "data"))
from make_fake_benchmarks import make_all  # noqa: E402


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    return make_all(tmp_path_factory.mktemp("benchmarks"))


@pytest.fixture(autouse=True)
def fake_model(monkeypatch):
    """Until a registered model is needed, `--model fake` loads the deterministic test model."""
    monkeypatch.setattr(commands, "load_model", lambda spec, random_init=False, device=None: FakeCIRModel())


MODULES = {"cirr": "CIRRDataModule", "circo": "CIRCODataModule", "fashioniq": "FashionIQDataModule"}


def _run(benchmark, root, split, out, *extra) -> int:
    data = ["--data", MODULES.get(benchmark, benchmark), "--data.root", str(root)]
    argv = ["--model", "fake", *data, "--split", split]
    return evaluate_command([*argv, "--output_dir", str(out), "--progress", "false", *extra])


def _check(path, benchmark, root, *split) -> int:
    return check_submission_command([str(path), "--data", MODULES[benchmark], "--data.root", str(root), *split])


def _load(path: Path):
    return json.loads(path.read_text())


def _recall(ranked: list, target, k: int) -> float:
    return float(target in ranked[:k])


def test_cirr_metrics_match_the_ranking_files(roots, tmp_path, capsys):
    assert _run("cirr", roots["cirr"], "val", tmp_path) == 0
    assert "cirr/R@1" in capsys.readouterr().out
    metrics = _load(tmp_path / "metrics.json")
    recall, subset = _load(tmp_path / "cirr_val_recall.json"), _load(tmp_path / "cirr_val_recall_subset.json")
    assert recall["version"] == subset["version"] == "rc2" and subset["metric"] == "recall_subset"
    queries = _load(roots["cirr"] / "cirr" / "captions" / "cap.rc2.val.json")
    expect = {}
    for k in (1, 5, 10, 50):
        expect[f"cirr/R@{k}"] = (
            100 * sum(_recall(recall[str(q["pairid"])], q["target_hard"], k) for q in queries) / len(queries)
        )
    for k in (1, 2, 3):
        expect[f"cirr/Rs@{k}"] = (
            100 * sum(_recall(subset[str(q["pairid"])], q["target_hard"], k) for q in queries) / len(queries)
        )
    expect["cirr/Avg"] = (expect["cirr/R@5"] + expect["cirr/Rs@1"]) / 2
    assert {k: metrics[k] for k in expect} == pytest.approx(expect)
    assert metrics["protocol/labels"] == "hard" and metrics["protocol/exclude_reference"] is True
    for q in queries:
        assert q["reference"] not in recall[str(q["pairid"])] and len(recall[str(q["pairid"])]) == 50
    for name in ("cirr_val_recall.json", "cirr_val_recall_subset.json"):
        assert _check(tmp_path / name, "cirr", roots["cirr"], "--split", "val") == 0
    picture = Image.open(tmp_path / "retrieval_examples.png")  # `coalign evaluate` draws a few queries too
    assert picture.width > 5 * 96 and picture.height > 96


def test_fashioniq_metrics_match_the_ranking_files(roots, tmp_path):
    assert _run("fashioniq", roots["fashioniq"], "val", tmp_path, "--data.caption_join", "both_orders") == 0
    metrics = _load(tmp_path / "metrics.json")
    assert metrics["protocol/caption_join"] == "both_orders" and metrics["protocol/gallery"] == "split"
    avg = {10: [], 50: []}
    for cat in ("dress", "shirt", "toptee"):
        ranks = _load(tmp_path / f"fashioniq_{cat}_val.json")
        caps = _load(roots["fashioniq"] / "captions" / f"cap.{cat}.val.json")
        gallery = set(_load(roots["fashioniq"] / "image_splits" / f"split.{cat}.val.json"))
        assert set(ranks) == {str(i) for i in range(len(caps))}
        assert all(len(r) == 50 and set(r) <= gallery for r in ranks.values())
        for k in (10, 50):
            value = 100 * sum(_recall(ranks[str(i)], c["target"], k) for i, c in enumerate(caps)) / len(caps)
            assert metrics[f"fashioniq/{cat}/R@{k}"] == pytest.approx(value)
            avg[k].append(value)
    assert metrics["fashioniq/avg/R@10"] == pytest.approx(sum(avg[10]) / 3)
    assert metrics["fashioniq/avg"] == pytest.approx((sum(avg[10]) + sum(avg[50])) / 6)


def test_circo_metrics_match_the_ranking_file(roots, tmp_path):
    assert (
        _run("circo", roots["circo"], "val", tmp_path, "--data.query_template", "find {shared_concept} but {caption}")
        == 0
    )
    metrics, ranks = _load(tmp_path / "metrics.json"), _load(tmp_path / "circo_val.json")
    queries = _load(roots["circo"] / "annotations" / "val.json")
    for k in (5, 10, 25, 50):
        total = 0.0
        for q in queries:
            labels = [int(p in q["gt_img_ids"]) for p in ranks[str(q["id"])]]
            hits = [sum(labels[: i + 1]) * labels[i] / (i + 1) for i in range(len(labels))]
            total += sum(hits[:k]) / min(len(q["gt_img_ids"]), k)
        assert metrics[f"circo/mAP@{k}"] == pytest.approx(100 * total / len(queries))
    assert metrics["protocol/query_template"] == "find {shared_concept} but {caption}"
    assert _check(tmp_path / "circo_val.json", "circo", roots["circo"], "--split", "val") == 0


def test_test_splits_write_only_upload_files_that_pass(roots, tmp_path, capsys):
    assert _run("cirr", roots["cirr"], "test1", tmp_path / "c") == 0
    assert _run("circo", roots["circo"], "test", tmp_path / "o", "--cache_dir", str(tmp_path / "cache")) == 0
    assert _run("fashioniq", roots["fashioniq"], "test", tmp_path / "f", "--data.categories", "[dress]") == 0
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "cirr_test1_recall.json",
        "cirr_test1_recall_subset.json",
    ]
    assert [p.name for p in (tmp_path / "f").iterdir()] == ["fashioniq_dress_test.json"]
    assert "no labels" in capsys.readouterr().out
    for name in ("cirr_test1_recall.json", "cirr_test1_recall_subset.json"):
        assert _check(tmp_path / "c" / name, "cirr", roots["cirr"]) == 0
    assert _check(tmp_path / "o" / "circo_test.json", "circo", roots["circo"]) == 0
    # the val run reuses the test run's gallery cache: CIRCO's gallery is shared
    assert _run("circo", roots["circo"], "val", tmp_path / "v", "--cache_dir", str(tmp_path / "cache")) == 0
    assert _load(tmp_path / "v" / "metrics.json")["protocol/gallery_cache"] == "hit"


def test_check_submission_reports_every_problem(roots, tmp_path, capsys):
    out = tmp_path / "ok"
    assert _run("cirr", roots["cirr"], "test1", out) == 0
    sub = _load(out / "cirr_test1_recall.json")
    queries = _load(roots["cirr"] / "cirr" / "captions" / "cap.rc2.test1.json")
    first, second, third, fourth = (str(q["pairid"]) for q in queries[:4])
    del sub[first]
    sub[second] = sub[second][:10]
    sub[third][1] = sub[third][0]
    sub[fourth][0] = queries[3]["reference"]
    sub["999999"] = []
    sub["version"] = "rc1"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(sub) + " " * 5_000_001)
    assert _check(bad, "cirr", roots["cirr"]) == 1
    report = capsys.readouterr().out
    for phrase in (
        "missing pairids",
        "list length is not 50",
        "duplicate entries",
        "reference image not excluded",
        "pairids not in test1",
        '"version" is not "rc2"',
        "larger than 5000000 bytes",
    ):
        assert phrase in report, phrase
    circo = {"0": [1, 1], "7": []}
    bad.write_text(json.dumps(circo))
    assert _check(bad, "circo", roots["circo"]) == 1
    report = capsys.readouterr().out
    for phrase in ("missing query ids", "query ids not in test", "duplicate entries", "ids not in the gallery"):
        assert phrase in report, phrase


def test_command_errors_are_clear(roots, tmp_path, capsys):
    assert _run("cirr", roots["cirr"], "test", tmp_path) == 2
    err = capsys.readouterr().err
    assert "valid splits: train, val, test1" in err and len(err.strip().splitlines()) == 1
    assert _run("NopeDataModule", roots["cirr"], "val", tmp_path) == 2
    assert "NopeDataModule" in capsys.readouterr().err
    # a protocol option of another benchmark is refused, not ignored
    assert _run("cirr", roots["cirr"], "val", tmp_path, "--data.caption_join", "reversed") == 2
    assert "caption_join" in capsys.readouterr().err
    assert evaluate_command(["--help"]) == 0
    assert "--data.query_template" in capsys.readouterr().out
    assert evaluate_command(["--data.help", "CIRCODataModule"]) == 0
    assert "query_template" in capsys.readouterr().out


def test_evaluate_reads_its_options_from_a_config_file(roots, tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text(
        f"model: fake\ndata:\n  class_path: CIRRDataModule\n  init_args:\n    root: {roots['cirr']}\n"
        f"    labels: soft\noutput_dir: {tmp_path / 'out'}\nprogress: false\n"
    )
    assert evaluate_command(["--config", str(config)]) == 0
    assert _load(tmp_path / "out" / "metrics.json")["protocol/labels"] == "soft"
