"""The model card: Hub metadata through huggingface_hub (read back with ``ModelCard.load``), the usage snippet's
source, and training facts recorded from the run itself."""

from __future__ import annotations

import json
from types import SimpleNamespace

import lightning as L
import pytest
from huggingface_hub import HfApi, ModelCard

from coalign import CoAlign, create_model
from coalign._hub import metric_sort_key
from coalign.callbacks import ExportPretrained
from coalign.datamodules import ShapesDataModule
from coalign.heads.global_alignment import ContextualAlignmentHead
from tests._tiny_hf import tiny_clip_backbone

CIRR_METRICS = {"cirr/R@50": 90.0, "cirr/Avg": 70.25, "cirr/R@10": 80.0, "cirr/Rs@1": 65.5, "cirr/R@1": 40.125,
                "cirr/R@5": 75.0}  # fmt: skip


def _clip_model(tmp_path) -> CoAlign:
    """A tiny random CLIP model labelled as built on openai/clip-vit-base-patch32 (its config is given: no download)."""
    backbone = tiny_clip_backbone(tmp_path, model_name="openai/clip-vit-base-patch32")
    return CoAlign(backbone, ContextualAlignmentHead(beta=0.2)).eval()


def test_card_metadata_round_trips_through_model_card_load(tmp_path):
    model = _clip_model(tmp_path)
    training = {"steps": 30, "epochs": 1, "datamodule": "TripletsDataModule", "train_size": 240, "wall_time_s": 75.4,
                "precision": "32-true", "device": "cpu"}  # fmt: skip
    model.card_info.update(
        name="coalign_clip_vitb32",
        metrics=dict(CIRR_METRICS),
        metric_splits={"cirr": "val"},
        training=training,
        training_data="my triplets.csv",
        datasets=["me/my-triplets"],
    )
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    card = ModelCard.load(folder / "README.md")
    data = card.data
    assert data.library_name == "coalign"
    assert data.pipeline_tag == "image-feature-extraction"
    assert data.license == "apache-2.0"
    assert data.base_model == "openai/clip-vit-base-patch32"
    assert {"coalign", "composed-image-retrieval"} <= set(data.tags)
    assert data.datasets == ["me/my-triplets"]
    results = data.eval_results
    assert [r.metric_type for r in results] == ["R@1", "R@5", "R@10", "R@50", "Rs@1", "Avg"]
    assert [r.metric_value for r in results] == [40.12, 75.0, 80.0, 90.0, 65.5, 70.25]  # rounded to 2 places
    assert {(r.dataset_name, r.dataset_type, r.dataset_split, r.task_type) for r in results} == {
        ("CIRR", "cirr", "val", "image-feature-extraction")
    }
    index = data.to_dict()["model-index"]  # what the Hub reads
    assert index[0]["results"][0]["dataset"] == {"name": "CIRR", "type": "cirr", "split": "val"}
    text = card.text
    assert f"CoAlign.from_pretrained({json.dumps(str(folder))})" in text
    assert "| steps run | 30 |" in text and "| training examples | 240 |" in text
    assert "| wall time (this run) | 0:01:15 (75.4 s) |" in text
    assert "my triplets.csv" in text and "arXiv:2507.05970" in text
    assert "github.com" not in card.content and "<this repo" not in card.content
    table = [line for line in text.splitlines() if line.startswith("| CIRR |")]
    order = ["R@1", "R@5", "R@10", "R@50", "Rs@1", "Avg"]
    assert [line.split("|")[3].strip() for line in table] == [f"cirr/{m}" for m in order]
    # the card info travels in config.json and comes back with the model
    assert CoAlign.from_pretrained(folder).card_info == json.loads(json.dumps(model.card_info))


def test_metrics_are_ordered_by_benchmark_subset_and_k():
    keys = ["fashioniq/dress/R@50", "fashioniq/avg", "fashioniq/dress/R@10", "circo/R@5", "circo/mAP@50",
            "circo/mAP@5", "circo/mAP@10", "circo/R@10", "fashioniq/avg/R@10", "R@1"]  # fmt: skip
    assert sorted(keys, key=metric_sort_key) == [
        "R@1",
        "circo/R@5", "circo/R@10", "circo/mAP@5", "circo/mAP@10", "circo/mAP@50",
        "fashioniq/avg",
        "fashioniq/avg/R@10",
        "fashioniq/dress/R@10", "fashioniq/dress/R@50",
    ]  # fmt: skip


def test_an_untrained_tiny_model_has_no_base_model_and_says_what_is_missing(tmp_path):
    model = create_model("coalign_tiny", channels=8, embed_dim=32)
    model.card_info["metrics"] = {"R@1": 12.0}  # no benchmark prefix: on the table, not in the model-index
    model.save_pretrained(tmp_path / "m")
    card = ModelCard.load(tmp_path / "m" / "README.md")
    assert card.data.base_model is None and card.data.eval_results is None
    assert card.data.model_name == "coalign_tiny"
    assert "Not recorded" in card.text and "| - | not recorded | R@1 | 12.00 |" in card.text
    model.card_info["metrics"] = {"cirr/R@1": "high"}
    with pytest.raises(ValueError, match=r"card_info\['metrics'\]\['cirr/R@1'\] = 'high' is not a number"):
        model.save_pretrained(tmp_path / "bad")


def test_push_to_hub_writes_the_resolved_repo_id_into_the_card(tmp_path, monkeypatch):
    uploads = []

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=f"me/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        files = sorted(p.relative_to(folder_path).as_posix() for p in folder_path.rglob("*") if p.is_file())
        uploads.append((repo_id, files, ModelCard.load(folder_path / "README.md")))
        return "https://huggingface.co/me/tiny/commit/0"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    model = create_model("coalign_tiny", channels=8, embed_dim=32)
    assert model.push_to_hub("tiny") == "https://huggingface.co/me/tiny/commit/0"
    [(repo_id, files, card)] = uploads
    assert repo_id == "me/tiny"
    assert {"README.md", "config.json", "model.safetensors"} <= set(files)
    assert 'CoAlign.from_pretrained("me/tiny")' in card.text
    assert card.data.model_name == "tiny" and card.data.library_name == "coalign"
    with pytest.raises(TypeError, match="takes no config"):
        model.push_to_hub("tiny", config={"a": 1})


def test_a_short_fit_records_the_steps_it_ran_not_the_configured_ones(tmp_path):
    model = create_model("coalign_tiny", channels=8, embed_dim=32)
    data = ShapesDataModule(num_train_sources=8, num_eval_sources=4, batch_size=8, image_transform=model.preprocess)
    export = ExportPretrained(training_data="Shapes, from scratch", license="mit")
    trainer = L.Trainer(max_steps=400, max_epochs=1, limit_train_batches=2, limit_val_batches=0, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=tmp_path, callbacks=[export])  # fmt: skip
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 2
    facts = json.loads((tmp_path / "model" / "config.json").read_text())["card"]["training"]
    assert facts["steps"] == 2 and facts["epochs"] == 1
    assert facts["datamodule"] == "ShapesDataModule"
    assert facts["train_size"] == len(data.build_split("train")[0])
    assert facts["wall_time_s"] >= 0 and facts["device"] == "cpu" and facts["precision"] == "32-true"
    card = ModelCard.load(tmp_path / "model" / "README.md")
    assert card.data.license == "mit"
    assert "| steps run | 2 |" in card.text and "400" not in card.text.split("## Configuration")[0]
    assert "Shapes, from scratch" in card.text
    # a test run adds its metrics with their split, in R@K order, and keeps the training facts
    trainer.test(model, datamodule=data, verbose=False)
    card = ModelCard.load(tmp_path / "model" / "README.md")
    results = card.data.eval_results
    assert [r.metric_type for r in results] == ["R@1", "R@5", "R@10", "R@50"]
    assert {(r.dataset_name, r.dataset_split) for r in results} == {("Shapes", model.last_evaluation.split)}
    assert model.last_evaluation.split == "test" and "| steps run | 2 |" in card.text
