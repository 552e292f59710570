"""Grouped training data and zero-shot wiring: CIRR image sets as groups, ZeroShotDataModule end to end."""

import json
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image

from coalign import CoAlign
from coalign.backbones import TinyBackbone
from coalign.datamodules import (
    CIRDataModule,
    CIRHSDataModule,
    CIRRDataModule,
    GroupedBatchSampler,
    ShapesDataModule,
    ZeroShotDataModule,
)
from coalign.heads import ContextualAlignmentHead, TokenReasoningHead

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "data"))
from make_fake_benchmarks import make_cirr  # noqa: E402

COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]


def _identity(image: Image.Image) -> torch.Tensor:
    return torch.zeros(3, 8, 8)


# -- CIRR: image sets are the training groups ---------------------------------------------------------------
@pytest.fixture(scope="module")
def cirr_root(tmp_path_factory):
    return make_cirr(tmp_path_factory.mktemp("cirr"))


def test_cirr_training_groups_are_image_sets(cirr_root):
    data = CIRRDataModule(cirr_root, batch_size=4, group_size=2, image_transform=_identity)
    captions = json.loads((cirr_root / "cirr" / "captions" / "cap.rc2.train.json").read_text())
    records = data.train_dataset().records
    assert [r["group"] for r in records] == [c["img_set"]["id"] for c in captions]  # 0, 0, 1, 1, ...
    loader = data.train_dataloader()
    assert isinstance(loader.batch_sampler, GroupedBatchSampler) and loader.batch_sampler.group_size == 2
    seen = []
    for batch in loader:
        groups = batch["group"].tolist()
        # the fake file has two pairs per image set: every chunk of two is one set
        assert len(groups) == 4 and groups[0] == groups[1] and groups[2] == groups[3], groups
        seen += batch["index"].tolist()
    assert sorted(seen) == list(range(len(captions)))  # one epoch visits every pair once


def test_cirr_group_size_must_divide_the_batch_and_sets_need_ids(cirr_root, tmp_path):
    data = CIRRDataModule(cirr_root, batch_size=6, group_size=4, image_transform=_identity)
    assert len(data.query_dataloader("val").dataset) == 12  # evaluation takes any batch size
    with pytest.raises(ValueError, match=r"batch_size \(6\) to be a multiple of group_size \(4\)"):
        data.train_dataloader()
    path = cirr_root / "cirr" / "captions" / "cap.rc2.train.json"
    captions = json.loads(path.read_text())
    del captions[3]["img_set"]["id"]
    copy = tmp_path / "cirr"
    (copy / "cirr" / "captions").mkdir(parents=True)
    (copy / "cirr" / "image_splits").symlink_to(cirr_root / "cirr" / "image_splits")
    (copy / "cirr" / "captions" / "cap.rc2.train.json").write_text(json.dumps(captions))
    with pytest.raises(ValueError, match="entry 3 needs img_set.id"):
        CIRRDataModule(copy).split_data("train")


# -- ZeroShotDataModule ---------------------------------------------------------------------------------------
def _tiny_cirhs(root: Path, groups: int = 6) -> Path:
    """A CIRHS-format folder of real groups: source->edit1, edit1->source, source->edit2, edit2->source."""
    lines = []
    for g in range(groups):
        names = [f"images/{g:03d}/{side}.png" for side in ("source", "edit1", "edit2")]
        for k, name in enumerate(names):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (32, 32), COLORS[(g + k) % len(COLORS)]).save(root / name)
        src, e1, e2 = names
        split = "val" if g == groups - 1 else "train"
        for ref, tgt, text in ((src, e1, "add a square"), (e1, src, "remove the square"),
                               (src, e2, "make it red"), (e2, src, "make it blue")):  # fmt: skip
            lines.append({"reference": ref, "target": tgt, "text": text, "group": g, "split": split})
    (root / "triplets.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


def _zeroshot(root: Path, **kwargs) -> ZeroShotDataModule:
    train = CIRHSDataModule(str(root), batch_size=8, group_size=4)
    test = ShapesDataModule(image_size=32, num_train_sources=0, num_eval_sources=4, batch_size=8)
    return ZeroShotDataModule(train, test, **kwargs)


def test_zeroshot_forwards_transform_loaders_and_evaluation(tmp_path):
    data = _zeroshot(_tiny_cirhs(tmp_path), num_workers=0)
    assert data.train_data.num_workers == data.test_data.num_workers == 0
    data.connect(_identity)
    assert data.train_data.transform is _identity and data.test_data.transform is _identity
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["group"].tolist()[:4] == [batch["group"][0].item()] * 4  # a whole group in one chunk
    assert set(batch["reference_id"][:4]) == set(batch["target_id"][:4])  # source and its edits, both ways
    task = data.evaluation_task("test")
    assert task.split == "test" and data.has_gallery
    assert task.evaluator.gallery_ids == [i for b in task.gallery for i in b["image_id"]]
    assert len(data.test_dataloader().dataset) == len(data.test_data.build_split("test")[0])


def test_zeroshot_setup_sends_each_stage_to_the_right_module():
    calls = []

    class Recorder(CIRDataModule):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def setup(self, stage=None):
            calls.append((self.name, stage))

    data = ZeroShotDataModule(Recorder("train"), Recorder("test"))
    for stage in ("fit", "validate", "test"):
        data.setup(stage)
    assert calls == [("train", "fit"), ("test", "validate"), ("test", "validate"), ("test", "test")]


def test_zeroshot_rejects_what_is_not_a_datamodule():
    with pytest.raises(TypeError, match="test must be a CIRDataModule"):
        ZeroShotDataModule(CIRHSDataModule("x"), "ShapesDataModule")


def test_zeroshot_trains_on_one_and_tests_on_the_other(tmp_path):
    torch.manual_seed(0)
    backbone = TinyBackbone(image_size=32, channels=8, embed_dim=32, token_dim=16, text_layers=1, max_length=16)
    model = CoAlign(backbone, ContextualAlignmentHead(beta=0.2), TokenReasoningHead(top_k=2))
    data = _zeroshot(_tiny_cirhs(tmp_path / "cirhs"))
    data.connect(model.preprocess)
    trainer = L.Trainer(
        accelerator="cpu",
        fast_dev_run=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        default_root_dir=tmp_path / "run",
    )
    trainer.fit(model, datamodule=data)
    assert torch.isfinite(trainer.callback_metrics["train/global_loss"])
    assert "train/local_loss" in trainer.callback_metrics
    trainer.test(model, datamodule=data, verbose=False)
    keys = {k for k in trainer.callback_metrics if k.startswith("test/")}
    assert {"test/shapes/R@1", "test/shapes/R@5", "test/shapes/R@10", "test/shapes/R@50"} <= keys
    assert model.last_evaluation.split == "test"
