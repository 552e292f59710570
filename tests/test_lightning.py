"""Lightning paths: `coalign fit` -> .ckpt -> load_from_checkpoint, Python -> .ckpt, validate == test code."""

import json

import lightning as L
import pytest
import torch

from coalign import CoAlign, create_model
from coalign.cli import main
from coalign.datamodules import ShapesDataModule
from coalign.transforms import ImageTransform

SMALL_DATA = ["--data.num_train_sources", "16", "--data.num_eval_sources", "6", "--data.batch_size", "8",
              "--data.num_workers", "0"]  # fmt: skip
SMALL_MODEL = ["--model.backbone.init_args.channels", "8", "--model.backbone.init_args.embed_dim", "32",
               "--model.backbone.init_args.text_layers", "1"]  # fmt: skip


def _outputs(model: CoAlign):
    model.eval()
    torch.manual_seed(3)
    images = torch.randn(2, 3, 32, 32)
    q = model.encode_queries(images, ["add a red circle at the top", "remove the blue square"])
    return model.similarity(q, model.encode_targets(images))


def test_cli_fit_checkpoint_and_quickstart_outputs(tmp_path):
    root = tmp_path / "run"
    args = ["fit", "--config", "configs/quickstart.yaml", "--trainer.max_steps", "3", "--trainer.max_time", "null",
            "--trainer.default_root_dir", str(root), "--model.lr_scheduler.init_args.total_steps", "3"]  # fmt: skip
    assert main(args + SMALL_DATA + SMALL_MODEL) == 0
    metrics = json.loads((root / "metrics.json").read_text())
    assert set(metrics) >= {"shapes/R@1", "shapes/R@5", "shapes/R@10", "shapes/R@50"}
    assert all(0 <= metrics[k] <= 100 for k in metrics if k.startswith("shapes/"))
    assert (root / "retrieval_examples.png").stat().st_size > 1000
    ckpt = next(root.rglob("*.ckpt"))
    from_ckpt = CoAlign.load_from_checkpoint(ckpt, weights_only=True)
    exported = CoAlign.from_pretrained(root / "model")
    assert torch.equal(_outputs(from_ckpt), _outputs(exported))
    assert "shapes/R@1" in (root / "model" / "README.md").read_text()


def test_python_checkpoint_round_trip(tmp_path):
    model = create_model("coalign_tiny", channels=8, embed_dim=32)
    data = ShapesDataModule(num_train_sources=8, num_eval_sources=4, batch_size=8, image_transform=model.preprocess)
    trainer = L.Trainer(max_steps=2, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                        limit_val_batches=0, enable_model_summary=False)  # fmt: skip
    trainer.fit(model, datamodule=data)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    loaded = CoAlign.load_from_checkpoint(tmp_path / "m.ckpt", weights_only=True)
    assert torch.equal(_outputs(model), _outputs(loaded))
    assert loaded.optimizer_factory.spec() == model.optimizer_factory.spec()


def test_validate_and_test_give_the_same_numbers_on_the_same_split(tmp_path):
    model = create_model("coalign_tiny", channels=8, embed_dim=32)
    data = ShapesDataModule(num_train_sources=8, num_eval_sources=5, batch_size=8, image_transform=model.preprocess)
    data.evaluation_split = lambda stage: "test"  # point both stages at one split
    data.val_dataloader = data.test_dataloader
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    val = trainer.validate(model, datamodule=data, verbose=False)[0]
    test = trainer.test(model, datamodule=data, verbose=False)[0]
    assert val["val/shapes/R@1"] == pytest.approx(test["test/shapes/R@1"])
    assert val["val/shapes/R@10"] == pytest.approx(test["test/shapes/R@10"])


def test_shapes_is_deterministic_and_hard():
    a, b = ShapesDataModule(image_transform=ImageTransform(32)), ShapesDataModule(image_transform=ImageTransform(32))
    records, gallery = a.build_split("test")
    assert [r["text"] for r in records] == [r["text"] for r in b.build_split("test")[0]]
    ids = {s.key for s in gallery}
    assert len(ids) == len(gallery) >= 1000
    assert all(r["target_id"] in ids and r["reference_id"] in ids for r in records)
    # every target has a look-alike one edit away in the gallery
    train_keys = {r["target_id"] for r in a.build_split("train")[0]}
    assert len(train_keys) > 1000
    with pytest.raises(ValueError, match="valid splits"):
        a.build_split("dev")


def test_shapes_edits_are_invertible():
    import random

    from coalign.datamodules.shapes import ShapesWorld

    world, rng = ShapesWorld(), random.Random(0)
    scene = world.sample_scene(rng)
    for kind in ("add", "remove", "recolor", "resize", "move"):
        out = world.edit(scene, rng, kind)
        if out is None:
            continue
        target, forward, backward = out
        assert target.key != scene.key and forward and backward
