"""Long runs survive: `--ckpt_path last` resumes, the data order resumes mid-epoch, nothing trains on nothing."""

import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from coalign import CoAlign
from coalign.callbacks import ExportPretrained
from coalign.cli import find_last_checkpoint, main
from coalign.datamodules import ShapesDataModule
from coalign.datamodules.base import CIRDataModule, EpochSequentialSampler, GroupedBatchSampler, TripletDataset

REPO = Path(__file__).resolve().parents[1]
TINY = ["--data.num_train_sources", "16", "--data.num_eval_sources", "6", "--data.batch_size", "8",
        "--data.num_workers", "0", "--model.backbone.init_args.channels", "8",
        "--model.backbone.init_args.embed_dim", "32", "--model.backbone.init_args.text_layers", "1",
        "--test_after_fit", "false", "--trainer.enable_progress_bar", "false", "--trainer.max_time", "null",
        "--model.lr_scheduler.init_args.total_steps", "8"]  # fmt: skip
STEPS: list[int] = []  # global steps that ran a training batch, filled by StepRecorder


class StepRecorder(L.Callback):
    """Records the global step of every training batch (used through `--trainer.callbacks+=`)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        STEPS.append(trainer.global_step)


class SlowSteps(L.Callback):
    """Makes each step last a while, so a test can kill the run between two checkpoints."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(0.5)


class Recorder(L.LightningModule):
    """A one-weight model that records the batches and random draws of its steps."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[list[int], float]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((batch["index"].tolist(), torch.rand(()).item()))  # rand: like dropout
        return (self.w - batch["reference"].mean()).pow(2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _pixel(image) -> torch.Tensor:
    return torch.tensor(image.getpixel((0, 0)), dtype=torch.float32)


def _fit(root: Path, max_steps: int, ckpt_path=None, every: int | None = None) -> Recorder:
    torch.manual_seed(0)  # each run as a fresh process would start
    model = Recorder()
    data = ShapesDataModule(num_train_sources=5, num_eval_sources=2, batch_size=8, image_transform=_pixel)
    callbacks = [ModelCheckpoint(root, save_last=True, every_n_train_steps=every)] if every else []
    trainer = L.Trainer(max_steps=max_steps, default_root_dir=root, logger=False, enable_progress_bar=False,
                        limit_val_batches=0, enable_model_summary=False, callbacks=callbacks,
                        enable_checkpointing=bool(every))  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return model


def _sampler(n: int, **kwargs) -> GroupedBatchSampler:
    return GroupedBatchSampler(EpochSequentialSampler(range(n)), 4, True, [i // 3 for i in range(n)], 2, **kwargs)


# -- data order --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("epoch", [0, 3])
def test_grouped_sampler_resumes_mid_epoch_with_the_same_batches(epoch):
    whole = _sampler(40)
    whole.sampler.set_epoch(epoch)
    expected = list(whole)
    first = _sampler(40)
    first.sampler.set_epoch(epoch)
    it = iter(first)
    done = [next(it) for _ in range(3)]
    state = first.state_dict()
    assert state == {"epoch": epoch, "batches": 3}
    resumed = _sampler(40)  # a fresh process: epoch 0 until the state says otherwise
    resumed.load_state_dict(state)
    assert done + list(resumed) == expected
    assert list(resumed) == expected  # the skip applies to the resumed epoch only


def test_a_state_saved_at_the_end_of_an_epoch_does_not_skip_the_next_one():
    sampler = _sampler(40)
    sampler.load_state_dict({"epoch": 0, "batches": len(sampler)})
    sampler.sampler.set_epoch(1)  # Lightning moves on to the next epoch
    fresh = _sampler(40)
    fresh.sampler.set_epoch(1)
    assert list(sampler) == list(fresh)


@pytest.mark.parametrize("epoch", [0, 1])
def test_lightning_resume_sees_the_batches_and_random_draws_of_an_uninterrupted_run(tmp_path, epoch):
    whole = _fit(tmp_path / "whole", 9)
    per_epoch = len(ShapesDataModule(num_train_sources=5, image_transform=_pixel, batch_size=8).train_dataloader())
    killed_at = epoch * per_epoch + 2  # a checkpoint saved mid-epoch, as by a run killed after step k
    assert 1 < per_epoch < 9 - 2
    _fit(tmp_path / "run", killed_at, every=killed_at)
    resumed = _fit(tmp_path / "run", 9, ckpt_path=str(tmp_path / "run" / "last.ckpt"))
    assert resumed.seen == whole.seen[killed_at:]
    torch.testing.assert_close(resumed.w, whole.w)


def test_shuffled_plain_loaders_are_resumable_and_seeded_by_epoch():
    data = CIRDataModule(batch_size=4, image_transform=_pixel)
    dataset = TripletDataset([{"reference_image": None, "text": "", "index": i} for i in range(10)], _pixel)
    loader = data._loader(dataset, shuffle=True)
    sampler = loader.batch_sampler
    orders = []
    for epoch in (0, 0, 1):
        sampler.sampler.set_epoch(epoch)
        orders.append(list(sampler))
    assert orders[0] == orders[1] != orders[2] and sorted(sum(orders[0], [])) == list(range(10))
    assert hasattr(loader, "state_dict") and hasattr(loader, "load_state_dict")


# -- never train or export on nothing --------------------------------------------------------------------------
def test_zero_training_batches_is_an_error_that_says_why():
    data = CIRDataModule(batch_size=8, image_transform=_pixel)
    dataset = TripletDataset([{"reference_image": None, "text": "", "index": i} for i in range(6)], _pixel)
    sampler = GroupedBatchSampler(EpochSequentialSampler(dataset), 8, True, list(range(6)), 2)
    with pytest.raises(ValueError, match=r"0 batches \(6 triplets, batch_size 8, drop_last=True\).*lower batch_size"):
        data._loader(dataset, batch_sampler=sampler)
    assert len(data._loader(dataset, shuffle=True)) == 1  # a plain shuffle keeps the last incomplete batch


def test_export_needs_a_training_step_and_fast_dev_run_keeps_an_export(tmp_path, caplog):
    written = []
    model = SimpleNamespace(card_info={}, save_pretrained=written.append)
    export = ExportPretrained()
    trainer = SimpleNamespace(default_root_dir=str(tmp_path), global_step=0, ckpt_path=None, fast_dev_run=False)
    with caplog.at_level(logging.INFO, logger="coalign.callbacks"):
        export.on_fit_end(trainer, model)
        export.on_test_end(trainer, model)
    assert not written and "no training step ran" in caplog.text
    caplog.clear()
    (tmp_path / "model").mkdir()
    smoke = SimpleNamespace(default_root_dir=str(tmp_path), global_step=1, ckpt_path=None, fast_dev_run=True)
    with caplog.at_level(logging.INFO, logger="coalign.callbacks"):
        export.on_fit_end(smoke, model)
    assert not written and "fast_dev_run: did not save" in caplog.text
    trained = SimpleNamespace(default_root_dir=str(tmp_path), global_step=5, ckpt_path=None, fast_dev_run=False)
    export.on_fit_end(trained, model)
    assert written == [tmp_path / "model"]


# -- --ckpt_path last ----------------------------------------------------------------------------------------------
def test_find_last_checkpoint_takes_the_newest_across_version_folders(tmp_path):
    old = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    new = tmp_path / "checkpoints" / "last-v1.ckpt"
    for n, path in enumerate([new, old]):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"")
        os.utime(path, ns=(n * 10**9, (1 - n) * 10**9 + 10**9))
    assert find_last_checkpoint([tmp_path]) == new
    assert find_last_checkpoint([tmp_path / "nowhere"]) is None


def test_cli_ckpt_path_last_resumes_from_the_fixed_checkpoint_folder(tmp_path, capsys):
    root = tmp_path / "run"
    args = ["fit", "--config", str(REPO / "configs" / "quickstart.yaml"), "--trainer.default_root_dir", str(root),
            *TINY, "--trainer.callbacks+=test_resume.StepRecorder"]  # fmt: skip
    STEPS.clear()
    with pytest.warns(UserWarning, match=r"--ckpt_path last: no last\*\.ckpt under .*starting from step 0"):
        assert main([*args, "--trainer.max_steps", "2", "--ckpt_path", "last"]) == 0
    assert STEPS == [0, 1]
    assert (root / "checkpoints" / "last.ckpt").is_file()  # not lightning_logs/version_0/checkpoints
    STEPS.clear()
    assert main([*args, "--trainer.max_steps", "3", "--ckpt_path", "last"]) == 0
    assert STEPS == [2]  # resumed: Lightning alone looked in version_1/checkpoints and started from step 0


# -- a killed `coalign fit` ------------------------------------------------------------------------------------------
def _coalign_fit(root: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    args = [sys.executable, "-m", "coalign.cli", "fit", "--config", str(REPO / "configs" / "quickstart.yaml"),
            "--trainer.default_root_dir", str(root), *TINY, "--trainer.max_steps", "8",
            "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.save_last", "true",
            "--trainer.callbacks.every_n_train_steps", "1", *extra]  # fmt: skip
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _step(path: Path) -> int:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)["global_step"]
    except Exception:  # noqa: BLE001 - being written
        return -1


@pytest.mark.slow
def test_a_killed_coalign_fit_resumed_with_ckpt_path_last_ends_at_the_uninterrupted_weights(tmp_path):
    whole = _coalign_fit(tmp_path / "whole")
    killed = _coalign_fit(tmp_path / "killed", "--trainer.callbacks+=test_resume.SlowSteps")
    deadline = time.monotonic() + 300
    while killed.poll() is None and time.monotonic() < deadline:
        lasts = list((tmp_path / "killed" / "checkpoints").glob("last*.ckpt"))
        if any(_step(p) >= 2 for p in lasts):
            killed.send_signal(signal.SIGKILL)
            break
        time.sleep(0.1)
    assert killed.wait() == -signal.SIGKILL, killed.stdout.read()
    assert not (tmp_path / "killed" / "model").exists()
    assert whole.wait() == 0, whole.stdout.read()
    # another seed: started from scratch it would end elsewhere; resumed, the weights, optimizer, data order and
    # random state all come from the checkpoint
    resumed = _coalign_fit(tmp_path / "killed", "--ckpt_path", "last", "--seed_everything", "1")
    output = resumed.communicate()[0]
    assert resumed.returncode == 0, output
    assert "--ckpt_path last: resuming from" in output and "Restored all states" in output
    a = CoAlign.from_pretrained(tmp_path / "whole" / "model").state_dict()
    b = CoAlign.from_pretrained(tmp_path / "killed" / "model").state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4)
