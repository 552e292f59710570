"""The registered tiny model through `coalign evaluate` and through Lightning's validate/test loops (the two
paths give the same numbers), training on a benchmark's train split, and evaluator sync across DDP ranks."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import coalign
from coalign.callbacks import RetrievalReport
from coalign.cli import main
from coalign.commands.evaluate import check_submission_command
from coalign.datamodules import CIRRDataModule, CIRREvaluator, FashionIQDataModule

sys.path.insert(0, str(Path(__file__).parent / "data"))
from make_fake_benchmarks import make_cirr, make_fashioniq  # noqa: E402


@pytest.fixture(scope="module")
def cirr_root(tmp_path_factory) -> Path:
    return make_cirr(tmp_path_factory.mktemp("cirr"), gallery=24, queries=6)


def _trainer() -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)


def test_evaluate_command_with_a_registered_model(cirr_root, tmp_path, capsys):
    data = ["--data", "CIRRDataModule", "--data.root", str(cirr_root)]
    argv = ["evaluate", "--model", "coalign_tiny", "--random_init", "true", *data]
    assert main([*argv, "--split", "val", "--output_dir", str(tmp_path), "--progress", "false"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["protocol/model"] == "coalign_tiny" and 0 <= metrics["cirr/Avg"] <= 100
    assert main(["evaluate", "--model", "coalign_tiny", *data, "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "random_init" in err and len(err.strip().splitlines()) == 1  # one line, no traceback


def test_validate_and_test_loops_match_evaluate(cirr_root, tmp_path):
    torch.manual_seed(0)
    model = coalign.create_model("coalign_tiny")
    expected = coalign.evaluation.evaluate(model, CIRRDataModule(cirr_root, batch_size=5), "val", progress=False)
    data = CIRRDataModule(cirr_root, batch_size=4)
    data.connect(model.preprocess)
    _trainer().validate(model, datamodule=data)
    assert model.last_evaluation.metrics == pytest.approx(expected.metrics)
    assert set(model.last_evaluation.upload_files) == {"cirr_val_recall.json", "cirr_val_recall_subset.json"}
    _trainer().test(model, datamodule=data)  # test1: rankings only
    assert model.last_evaluation.split == "test1" and model.last_evaluation.metrics == {}


def test_a_datamodule_that_was_never_connected_says_so(cirr_root):
    model = coalign.create_model("coalign_tiny")
    with pytest.raises(RuntimeError, match=r"connect\(model.preprocess\)"):
        _trainer().validate(model, datamodule=CIRRDataModule(cirr_root, batch_size=4))


@pytest.mark.slow
def test_fit_on_fashioniq_train_split(tmp_path):
    root = make_fashioniq(tmp_path / "fiq", gallery=12, queries=4)
    dm = FashionIQDataModule(root, categories=["dress"], batch_size=4)
    model = coalign.create_model("coalign_tiny")
    dm.connect(model.preprocess)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, num_sanity_val_steps=0, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 2 and "fashioniq/dress/R@10" in model.last_evaluation.metrics


# -- DDP: two CPU (gloo) processes give the single-process numbers -------------------------------------------
NAMES = [f"g{i}" for i in range(60)]


def _queries() -> list[tuple[dict, list[str]]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(9):
        order = [NAMES[j] for j in torch.randperm(60, generator=g).tolist()]
        members = order[10:16]
        batch = {
            "index": torch.tensor([i]),
            "reference_id": [members[0]],
            "target_id": [members[1 + i % 5]],
            "subset_members": [members],
        }
        out.append((batch, order))
    return out


def _worker(rank: int, world: int, port: str, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ev = CIRREvaluator(NAMES)
    queries = _queries()
    # rank 1 also repeats query 0, as a DistributedSampler pads uneven splits
    mine = queries[rank::world] + ([queries[0]] if rank == 1 else [])
    for batch, order in mine:
        ev.update(batch, [order])
    results[rank] = (ev.compute(), ev.rankings(), ev.subset_rankings())
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_match_one_process():
    single = CIRREvaluator(NAMES)
    for batch, order in _queries():
        single.update(batch, [order])
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(2, "29517", results), nprocs=2, join=True)
    for rank in range(2):
        metrics, rankings, subsets = results[rank]
        assert metrics == pytest.approx(single.compute())
        assert rankings == single.rankings() and subsets == single.subset_rankings()


def test_coalign_test_writes_the_upload_files(cirr_root, tmp_path):
    model = coalign.create_model("coalign_tiny")
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[RetrievalReport(output_dir=str(tmp_path))])  # fmt: skip
    data = CIRRDataModule(cirr_root, batch_size=4)
    data.connect(model.preprocess)
    trainer.test(model, datamodule=data)  # test1: no labels
    assert not (tmp_path / "metrics.json").exists()
    for name in ("cirr_test1_recall.json", "cirr_test1_recall_subset.json"):
        argv = [str(tmp_path / name), "--data", "CIRRDataModule", "--data.root", str(cirr_root), "--split", "test1"]
        assert check_submission_command(argv) == 0


def test_validate_shows_a_progress_bar_for_gallery_encoding(cirr_root, capfd):
    model = coalign.create_model("coalign_tiny")
    data = CIRRDataModule(cirr_root, batch_size=4)
    data.connect(model.preprocess)
    _trainer().validate(model, datamodule=data, verbose=False)  # the progress bar is off: so is the gallery's
    assert "encoding gallery" not in capfd.readouterr().err
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_model_summary=False, enable_progress_bar=True)
    trainer.validate(model, datamodule=data, verbose=False)
    err = capfd.readouterr().err
    gallery = len(data.prepare_split("val").gallery)
    assert "encoding gallery" in err and f"0/{gallery} [" in err and "img/s" in err  # counted in images
