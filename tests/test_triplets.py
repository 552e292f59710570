"""Fine-tuning on one's own triplets: reading and checking the file, the splits, the loaders, fit -> publish."""

import contextlib
import io
import json
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub.hub_mixin
import pytest
import torch
from PIL import Image

import coalign._hub
from coalign import CoAlign
from coalign.backbones import TinyBackbone
from coalign.cli import main
from coalign.datamodules import TripletsDataModule
from coalign.heads import ContextualAlignmentHead, TokenReasoningHead
from coalign.transforms import ImageTransform

REPO = Path(__file__).resolve().parents[1]


def _images(root, n):
    rng = random.Random(n)
    (root / "img").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (20, 16), tuple(rng.randrange(256) for _ in range(3))).save(root / "img" / f"{i}.png")
    return [f"img/{i}.png" for i in range(n)]


def _csv(path, rows, header="reference,text,target"):
    path.write_text("\n".join([header, *(",".join(map(str, r)) for r in rows)]) + "\n")
    return path


def _module(path, **kwargs):
    return TripletsDataModule(str(path), image_transform=ImageTransform(32), **kwargs)


def test_missing_columns_empty_values_and_missing_images_are_listed(tmp_path):
    images = _images(tmp_path, 4)
    bad = _csv(tmp_path / "bad.csv", [(images[0], "make it red")], header="reference,caption")
    with pytest.raises(
        ValueError, match=r"lacks the column\(s\) \['text', 'target'\]; it has \['reference', 'caption'\]"
    ):
        _module(bad).setup()
    empty = _csv(tmp_path / "empty.csv", [(images[0], "red", images[1]), (images[1], " ", images[2]), ("", "x", "y")])
    with pytest.raises(ValueError, match=r"2 row\(s\) .* lines \[3, 4\]"):
        _module(empty).setup()
    rows = [(images[0], "red", "img/gone1.png"), ("img/gone2.png", "blue", images[1]), (images[2], "x", images[3])]
    with pytest.raises(FileNotFoundError, match=r"2 of 6 image files are missing.*\n.*gone1.png\n.*gone2.png"):
        _module(_csv(tmp_path / "missing.csv", rows)).setup()
    (tmp_path / "sheet.xlsx").write_bytes(b"PK")
    with pytest.raises(ValueError, match="expected a .csv, .tsv or .jsonl"):
        _module(tmp_path / "sheet.xlsx").setup()


def test_groups_stay_whole_across_the_seeded_split(tmp_path):
    images = _images(tmp_path, 30)
    lines = [{"reference": images[i], "text": f"edit {i}", "target": images[(i + 1) % 30], "group": f"g{i // 3}"}
             for i in range(30)]  # fmt: skip
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    dm = _module(path, val_fraction=0.2, seed=3)
    dm.setup()
    val_groups = {r["unit"] for r in dm.records["val"]}
    train_groups = {r["unit"] for r in dm.records["train"]}
    assert len(val_groups) == 2 and not val_groups & train_groups and len(dm.records["val"]) == 6
    again = _module(path, val_fraction=0.2, seed=3)
    again.setup()
    assert [r["text"] for r in again.records["val"]] == [r["text"] for r in dm.records["val"]]
    # triplets of one group share a group id (soft positives); without a group column each triplet is its own
    assert len({r["group"] for r in dm.records["train"]}) == 8
    plain = _csv(tmp_path / "plain.csv", [(images[i], f"edit {i}", images[i + 1]) for i in range(10)])
    no_groups = _module(plain, val_fraction=0.3)
    no_groups.setup()
    assert len({r["group"] for r in no_groups.records["train"]}) == len(no_groups.records["train"]) == 7


def test_split_column_loaders_and_gallery(tmp_path):
    images = _images(tmp_path, 8)
    rows = [(images[i], f"make it number {i + 1}", images[i + 1], "val" if i >= 5 else "train") for i in range(7)]
    dm = _module(_csv(tmp_path / "t.csv", rows, header="reference,text,target,split"), batch_size=4)
    dm.setup()
    assert (len(dm.records["train"]), len(dm.records["val"])) == (5, 2)
    batch = next(iter(dm.train_dataloader()))
    assert batch["reference"].shape == batch["target"].shape == (4, 3, 32, 32) and len(batch["text"]) == 4
    query = next(iter(dm.val_dataloader()))
    assert "target" not in query and query["target_id"] == ["img/6.png", "img/7.png"]
    gallery = dm.gallery_dataset(dm.evaluation_split("validate"))
    assert [i for i, _ in gallery.entries] == ["img/5.png", "img/6.png", "img/7.png"]
    evaluator = dm.build_evaluator("val")
    assert evaluator.prefix == "triplets/" and evaluator.exclude_reference
    wrong = _csv(tmp_path / "w.csv", [(images[0], "x", images[1], "test")], header="reference,text,target,split")
    with pytest.raises(ValueError, match=r"'train' or 'val', found \['test'\]"):
        _module(wrong).setup()


def _tiny_model() -> CoAlign:
    """The architecture finetune_custom.yaml gets with the test's --model overrides."""
    # max_length 32: jsonargparse keeps the BLIP-2 init_args that TinyBackbone also accepts
    backbone = TinyBackbone(channels=8, embed_dim=32, token_dim=16, text_layers=1, max_length=32)
    return CoAlign(backbone, ContextualAlignmentHead(beta=0.1), TokenReasoningHead(top_k=8),
                   target_pad_ratio=1.25)  # fmt: skip


def test_finetune_custom_from_a_checkpoint_then_publish(tmp_path, monkeypatch):
    images = _images(tmp_path / "photos", 16)
    rows = [(images[i], f"turn it into picture {i + 1}", images[(i + 1) % 16]) for i in range(16)]
    triplets = _csv(tmp_path / "photos" / "mine.csv", rows)
    start = tmp_path / "start"
    _tiny_model().save_pretrained(start)
    run = tmp_path / "run"
    config = str(REPO / "configs" / "experiments" / "finetune_custom.yaml")
    args = ["fit", "--config", config, "--data.path", str(triplets),
            "--data.image_root", str(tmp_path / "photos"), "--data.batch_size", "4",
            "--data.num_workers", "0", "--data.val_fraction", "0.25",
            "--model.init_from", str(start), "--model.backbone", "coalign.backbones.TinyBackbone",
            "--model.backbone.init_args.channels", "8", "--model.backbone.init_args.embed_dim", "32",
            "--model.backbone.init_args.token_dim", "16", "--model.backbone.init_args.text_layers", "1",
            "--trainer.accelerator", "cpu",
            "--trainer.precision", "32-true", "--trainer.max_steps", "2", "--trainer.default_root_dir", str(run),
            "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(args) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"triplets/R@1", "triplets/R@10"} <= set(metrics)
    assert (run / "retrieval_examples.png").stat().st_size > 1000
    tuned = CoAlign.from_pretrained(run / "model")
    initial = CoAlign.from_pretrained(start)
    # started from the checkpoint: two warm-up steps at lr 1e-7 leave the weights where they were
    torch.testing.assert_close(tuned.backbone.word_embed.weight, initial.backbone.word_embed.weight, atol=1e-4, rtol=0)

    hub = tmp_path / "hub"  # a stand-in for the Hub: uploads land in a local folder

    class LocalHub:
        def __init__(self, token=None, **kwargs):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
            return SimpleNamespace(repo_id=repo_id)

        def upload_folder(self, repo_id, folder_path, **kwargs):
            shutil.copytree(folder_path, hub / repo_id)
            return f"local://{repo_id}"

    monkeypatch.setattr(huggingface_hub.hub_mixin, "HfApi", LocalHub)
    monkeypatch.setattr(coalign._hub, "HfApi", LocalHub)  # CoAlign.push_to_hub writes its own card, then uploads
    assert tuned.push_to_hub("me/my-cir") == "local://me/my-cir"
    card = (hub / "me" / "my-cir" / "README.md").read_text()
    assert "custom triplets" in card and "triplets/R@1" in card
    published = CoAlign.from_pretrained(hub / "me" / "my-cir")
    torch.testing.assert_close(published.backbone.word_embed.weight, tuned.backbone.word_embed.weight)
