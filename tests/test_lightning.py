"""Lightning paths: `coalign fit` -> .ckpt -> load_from_checkpoint, Python -> .ckpt, validate == test code."""

import json
import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from safetensors.torch import load_file

from coalign import CoAlign, create_model
from coalign._optim import WarmupCosine, build_optimizer_callable, build_scheduler
from coalign.callbacks import CleanProgressBar, ExportPretrained
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
            "--trainer.default_root_dir", str(root), "--model.lr_scheduler.init_args.total_steps", "null"]  # fmt: skip
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


def _cli(args: list[str]) -> int:
    try:
        return main(args)
    except SystemExit as exit_:  # --print_config and usage errors end with SystemExit
        return int(exit_.code or 0)


QUICK = ["--config", "quickstart", "--trainer.max_time", "null", "--trainer.enable_progress_bar", "false"]


# -- schedules ------------------------------------------------------------------------------------------------
def test_warmup_cosine_follows_its_formula():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupCosine(opt, total_steps=10, warmup_steps=2, min_lr_ratio=0.0)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(11):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    # warm-up 1/2, 2/2; then cos over 8 steps: step 6 is half way (0.5), step 10 the end (0), and it stays there
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert lrs[6] == pytest.approx(0.5) and lrs[4] == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lrs[10] == pytest.approx(0.0, abs=1e-12) and lrs[11] == pytest.approx(0.0, abs=1e-12)
    assert WarmupCosine(opt, total_steps=100, warmup_steps=0.1).warmup == 10  # a fraction of the length
    with pytest.raises(ValueError, match="total_steps"):
        WarmupCosine(opt, total_steps=None)


def test_a_schedule_spec_names_only_torch_or_coalign_schedules():
    spec = {"class_path": "coalign._optim.WarmupCosine", "init_args": {"warmup_steps": 5, "total_steps": None}}
    factory = build_optimizer_callable(spec)
    assert factory.cls is WarmupCosine and factory.spec() == spec  # round trip through hparams / config.json
    with pytest.raises(ValueError, match="not an optimizer or scheduler"):
        build_optimizer_callable({"class_path": "os.system"})
    with pytest.raises(ValueError, match="not an optimizer or scheduler"):
        build_optimizer_callable({"class_path": "coalign._optim.build_scheduler"})


def test_a_null_schedule_length_is_the_run_length():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    onecycle = build_optimizer_callable({"class_path": "torch.optim.lr_scheduler.OneCycleLR",
                                         "init_args": {"max_lr": 0.1, "total_steps": None}})  # fmt: skip
    assert build_scheduler(onecycle, opt, lambda: 7).total_steps == 7
    cosine = build_optimizer_callable({"class_path": "torch.optim.lr_scheduler.CosineAnnealingLR"})
    assert build_scheduler(cosine, opt, lambda: 9).T_max == 9
    given = build_optimizer_callable({"class_path": "torch.optim.lr_scheduler.OneCycleLR",
                                      "init_args": {"max_lr": 0.1, "total_steps": 3}})  # fmt: skip
    assert build_scheduler(given, opt, lambda: 1 / 0).total_steps == 3  # a given length is kept, never asked
    with pytest.raises(ValueError, match="run's length is unknown"):
        build_scheduler(onecycle, opt, lambda: float("inf"))


def test_fit_takes_the_schedule_length_from_the_trainer(tmp_path):
    scheduler = {"class_path": "coalign._optim.WarmupCosine", "init_args": {"warmup_steps": 2}}
    model = create_model("coalign_tiny", channels=8, embed_dim=32, lr_scheduler=scheduler)
    data = ShapesDataModule(num_train_sources=8, num_eval_sources=4, batch_size=8, image_transform=model.preprocess)
    trainer = L.Trainer(max_steps=5, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                        limit_val_batches=0, enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
    trainer.fit(model, datamodule=data)
    assert trainer.lr_scheduler_configs[0].scheduler.total_steps == 5
    assert model.config()["lr_scheduler"]["init_args"] == {"warmup_steps": 2}  # the spec stays length-free


# -- callbacks ------------------------------------------------------------------------------------------------
def _tiny_fit(tmp_path, **trainer_args):
    model = create_model("coalign_tiny", channels=8, embed_dim=32)
    data = ShapesDataModule(num_train_sources=8, num_eval_sources=4, batch_size=8, image_transform=model.preprocess)
    args = dict(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, limit_val_batches=0,
                enable_model_summary=False)  # fmt: skip
    trainer = L.Trainer(**{**args, **trainer_args})
    trainer.fit(model, datamodule=data)
    return model, trainer


def test_export_is_skipped_under_fast_dev_run(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "keep.txt").write_text("a real export")
    _tiny_fit(tmp_path, fast_dev_run=True, callbacks=[ExportPretrained()])
    assert [p.name for p in (tmp_path / "model").iterdir()] == ["keep.txt"]
    _tiny_fit(tmp_path / "fresh", fast_dev_run=True, callbacks=[ExportPretrained()])
    assert not (tmp_path / "fresh" / "model").exists()


def test_export_needs_a_training_step(tmp_path, caplog):
    written = []
    model = SimpleNamespace(card_info={}, save_pretrained=written.append)
    export = ExportPretrained()
    untrained = SimpleNamespace(default_root_dir=str(tmp_path), global_step=0, ckpt_path=None, fast_dev_run=False)
    with caplog.at_level("INFO", logger="coalign"):
        export.on_fit_end(untrained, model)
        export.on_test_end(untrained, model)
    assert not written and caplog.text.count("no training step ran") == 2
    trained = SimpleNamespace(default_root_dir=str(tmp_path), global_step=5, ckpt_path=None, fast_dev_run=False)
    export.on_fit_end(trained, model)  # no ModelCheckpoint: the last weights
    assert written == [tmp_path / "model"]


def test_export_takes_the_best_checkpoint_when_one_is_monitored(tmp_path):
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="train/loss", mode="max", save_top_k=1,
                           every_n_train_steps=1)  # fmt: skip
    model, _ = _tiny_fit(tmp_path, max_steps=4, callbacks=[best, ExportPretrained()])
    assert best.best_model_path and "step=4" not in best.best_model_path  # the highest loss: not the last step
    exported = CoAlign.from_pretrained(tmp_path / "model")
    state = torch.load(best.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
    for name, value in exported.state_dict().items():
        assert torch.equal(value, state[name]), name
    # the model itself keeps its last weights
    assert not all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_the_progress_bar_has_no_version_number_and_no_negative_epoch_count(tmp_path):
    bar = CleanProgressBar()
    model, trainer = _tiny_fit(tmp_path, max_steps=1, logger=CSVLogger(tmp_path), callbacks=[bar],
                               enable_progress_bar=True)  # fmt: skip
    assert "v_num" not in bar.get_metrics(trainer, model)
    assert bar.train_progress_bar.desc.startswith("Epoch 0 (max_steps 1)")


# -- the command ----------------------------------------------------------------------------------------------
def test_one_optimizer_setting_and_short_callback_names(capsys):
    assert _cli(["fit", *QUICK, "--optimizer", "SGD", "--print_config"]) == 2  # no top-level --optimizer
    assert "--optimizer" in capsys.readouterr().err
    argv = ["fit", *QUICK, "--model.optimizer", "SGD", "--model.optimizer.lr", "0.1", "--print_config",
            "--trainer.callbacks+=EmbeddingWriter", "--trainer.callbacks+=LearningRateMonitor"]  # fmt: skip
    assert _cli(argv) == 0
    printed = capsys.readouterr().out
    assert "class_path: coalign.callbacks.EmbeddingWriter" in printed
    assert "class_path: lightning.pytorch.callbacks.LearningRateMonitor" in printed
    assert "class_path: torch.optim.SGD" in printed and "AdamW" not in printed


def test_predict_writes_query_and_gallery_embeddings(tmp_path):
    root = tmp_path / "run"
    argv = ["predict", *QUICK, "--trainer.default_root_dir", str(root), "--data.num_eval_sources", "4"]
    assert main(argv + SMALL_DATA[:2] + SMALL_DATA[4:] + SMALL_MODEL) == 0
    out = root / "predictions"
    queries, gallery = load_file(out / "queries.safetensors"), load_file(out / "gallery.safetensors")
    ids = json.loads((out / "queries.json").read_text())
    gallery_ids = json.loads((out / "gallery.json").read_text())["image_id"]
    assert queries["query"].shape[0] == queries["target"].shape[0] == len(ids["target_id"]) > 0
    assert gallery["embedding"].shape == (len(gallery_ids), *queries["target"].shape[1:])
    # a query's target image, encoded as a target, is the gallery's row of that image
    for row, target_id in enumerate(ids["target_id"]):
        torch.testing.assert_close(queries["target"][row], gallery["embedding"][gallery_ids.index(target_id)])


def test_validate_prints_its_metrics_once(tmp_path, capfd, caplog):
    argv = ["validate", *QUICK, "--trainer.default_root_dir", str(tmp_path), "--trainer.limit_val_batches", "1.0"]
    with caplog.at_level("INFO", logger="coalign"):
        assert main(argv + SMALL_DATA + SMALL_MODEL) == 0
    captured = capfd.readouterr()
    assert "shapes/R@10" not in captured.out + captured.err  # no Lightning table beside RetrievalReport's
    assert caplog.text.count("shapes/R@10 ") == 1, caplog.text
    assert json.loads((tmp_path / "metrics.json").read_text())["stage"] == "val"


def test_test_after_fit_tests_and_exports_the_best_checkpoint(tmp_path, caplog):
    root = tmp_path / "run"
    best = ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.monitor", "train/loss",
            "--trainer.callbacks.mode", "max", "--trainer.callbacks.save_top_k", "1",
            "--trainer.callbacks.every_n_train_steps", "1", "--trainer.callbacks.filename", "best-{step}"]  # fmt: skip
    argv = ["fit", *QUICK, "--trainer.max_steps", "3", "--trainer.default_root_dir", str(root), *best,
            "--model.lr_scheduler.init_args.total_steps", "null"]  # fmt: skip
    with caplog.at_level("INFO", logger="coalign"):
        assert main(argv + SMALL_DATA + SMALL_MODEL) == 0
    path = next(root.glob("checkpoints/best-step=*.ckpt"))
    assert path.name != "best-step=3.ckpt"  # the highest loss: not the last step
    assert f"testing the best checkpoint {path}" in caplog.text
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    exported = CoAlign.from_pretrained(root / "model")
    assert all(torch.equal(v, state[k]) for k, v in exported.state_dict().items())
    assert "shapes/R@1" in (root / "model" / "README.md").read_text()  # exported again with the test metrics
