"""FashionIQ, CIRR and CIRCO DataModules on fake copies of the official layouts, and their bad inputs."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from _eval_fakes import FakeCIRModel

from coalign.datamodules import CIRCODataModule, CIRRDataModule, FashionIQDataModule
from coalign.datamodules.fashioniq import join_captions, random_caption_join
from coalign.evaluation import evaluate
from coalign.transforms import ImageTransform

sys.path.insert(0, str(Path(__file__).parent / "data"))
from make_fake_benchmarks import make_all, make_fashioniq  # noqa: E402

T = ImageTransform(8)


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    return make_all(tmp_path_factory.mktemp("benchmarks"))


def _copy(roots, name, tmp_path) -> Path:
    return Path(shutil.copytree(roots[name], tmp_path / name))


# -- FashionIQ ----------------------------------------------------------------------------------------------
def test_caption_joins_golden():
    caps = ["Is Red.", "has long sleeves?"]
    assert join_captions(caps) == "Is red and has long sleeves"  # str.capitalize lower-cases the rest
    assert join_captions(caps, "reversed") == "Has long sleeves and Is Red"  # only the first is re-cased
    assert join_captions(caps, "lowercase") == "is red and has long sleeves"
    # blank captions are kept as the peers keep them (CLIP4Cir/SPRC/SEARLE), and never stop a run
    assert join_captions(["is red", " "]) == "Is red and "
    assert join_captions(["", ""]) == " and " and join_captions([" ", "is blue"], "reversed") == "Is blue and "
    assert {random_caption_join(caps) for _ in range(200)} == {
        "Is red and has long sleeves",
        "Has long sleeves and Is Red",
        "Is red",
        "Has long sleeves",
    }


def test_fashioniq_gallery_is_the_split_file_not_the_folder(roots):
    dm = FashionIQDataModule(roots["fashioniq"], image_transform=T)
    data = dm.prepare_split("val")
    split_names = {
        n
        for c in ("dress", "shirt", "toptee")
        for n in json.loads((roots["fashioniq"] / "image_splits" / f"split.{c}.val.json").read_text())
    }
    assert set(data.gallery_ids) == split_names
    assert len(list((roots["fashioniq"] / "images").iterdir())) > len(split_names)  # folder holds more
    assert {len(v) for v in data.subsets.values()} == {56} and len(data.queries) == 24
    # the fake files hold blank captions: the query keeps the peers' literal "... and " text and is still ranked
    assert all(q["text"].strip() for q in data.queries) and any(q["text"].endswith(" and ") for q in data.queries)
    assert dm.image_extension == ".png"
    union = FashionIQDataModule(roots["fashioniq"], gallery="val_union", categories=["dress"]).split_data("val")
    assert len(union.gallery) < 56 and set(union.subsets) == {"dress"}


def test_fashioniq_jpg_copy_and_loaders(tmp_path):
    root = make_fashioniq(tmp_path / "fiq", ext=".jpg")
    dm = FashionIQDataModule(root, categories=["shirt"], caption_join="both_orders", image_transform=T, batch_size=4)
    dm.setup("fit")
    assert dm.image_extension == ".jpg"
    train = next(iter(dm.train_dataloader()))
    assert train["reference"].shape == train["target"].shape == (4, 3, 8, 8) and len(train["text"]) == 4
    query = next(iter(dm.val_dataloader()))
    assert {"reference", "text", "text_reversed", "reference_id", "target_id", "index", "category"} <= query.keys()
    assert "target" not in query  # evaluation finds the target in the gallery
    assert dm.build_evaluator("val").query_text_keys == ("text", "text_reversed")


def test_fashioniq_option_errors(roots):
    with pytest.raises(ValueError, match="dress, shirt, toptee"):
        FashionIQDataModule(roots["fashioniq"], categories=["hat"])
    with pytest.raises(ValueError, match="clip4cir"):
        FashionIQDataModule(roots["fashioniq"], caption_join="random")
    with pytest.raises(ValueError, match="test split"):
        FashionIQDataModule(roots["fashioniq"], gallery="val_union").split_data("test")


# -- CIRR ---------------------------------------------------------------------------------------------------
def test_cirr_splits_and_galleries(roots):
    dm = CIRRDataModule(roots["cirr"], image_transform=T, batch_size=5, group_size=1)  # 5: no multiple of 2..4
    val, test = dm.prepare_split("val"), dm.prepare_split("test1")
    assert len(val.gallery) == 60 and val.has_labels and not test.has_labels
    assert all(q["target_id"] == "" and "target_soft" not in q for q in test.queries)
    assert dm.evaluation_split("test") == "test1" and dm.evaluation_split("validate") == "val"
    batch = next(iter(dm.val_dataloader()))
    assert len(batch["subset_members"]) == 5 and len(batch["subset_members"][0]) == 6
    assert isinstance(batch["pairid"], torch.Tensor) and isinstance(batch["target_soft"][0], dict)
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))["target"].shape[0] == 5


def test_unknown_split_lists_valid_ones(roots):
    with pytest.raises(ValueError, match="valid splits: train, val, test1"):
        CIRRDataModule(roots["cirr"]).split_data("test")
    with pytest.raises(ValueError, match="valid splits: val, test"):
        CIRCODataModule(roots["circo"]).split_data("train")


def test_malformed_annotation_names_file_and_entry(roots, tmp_path):
    root = _copy(roots, "cirr", tmp_path)
    path = root / "cirr" / "captions" / "cap.rc2.val.json"
    entries = json.loads(path.read_text())
    del entries[3]["caption"]
    path.write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=r"cap\.rc2\.val\.json: entry 3 has no 'caption'"):
        CIRRDataModule(root).split_data("val")
    path.write_text("[{oops")
    with pytest.raises(ValueError, match=r"cap\.rc2\.val\.json is not valid JSON \(line 1"):
        CIRRDataModule(root).split_data("val")


def test_missing_images_reported_before_any_encoding(roots, tmp_path):
    root = _copy(roots, "cirr", tmp_path)
    split = json.loads((root / "cirr" / "image_splits" / "split.rc2.val.json").read_text())
    for rel in list(split.values())[:3]:
        (root / rel).unlink()
    model = FakeCIRModel()
    with pytest.raises(FileNotFoundError, match=r"3 of 60 cirr val image files are missing") as err:
        evaluate(model, CIRRDataModule(root), "val", progress=False)
    assert "dev-0-0-img0.png" in str(err.value) and model.target_calls == 0


# -- CIRCO --------------------------------------------------------------------------------------------------
def test_circo_gallery_and_template(roots):
    dm = CIRCODataModule(roots["circo"], query_template="find {shared_concept} but {caption}", image_transform=T)
    val = dm.prepare_split("val")
    assert len(val.gallery) == 64  # the image info, not the folder (65 files)
    assert all(q["text"].startswith("find a ") and " but " in q["text"] for q in val.queries)
    assert dm.split_data("test").gallery == val.gallery and not dm.split_data("test").has_labels
    with pytest.raises(ValueError, match="unknown fields"):
        CIRCODataModule(roots["circo"], query_template="{caption} {foo}")


def test_data_configs_build(roots, tmp_path):
    from jsonargparse import ArgumentParser

    from coalign.datamodules import CIRDataModule

    for name in ("fashioniq", "cirr", "circo"):
        config = Path(__file__).parents[1] / "configs" / "data" / f"{name}.yaml"
        parser = ArgumentParser()
        parser.add_subclass_arguments(CIRDataModule, "data")
        parser.add_argument("--config", action="config")
        cfg = parser.parse_args([f"--config={config}", f"--data.init_args.root={roots[name]}"])
        dm = parser.instantiate_classes(cfg).data
        assert dm.benchmark == name and dm.split_data("val").queries


# -- upload checks ------------------------------------------------------------------------------------------
def test_check_submission_on_the_datamodule(roots, tmp_path):
    cirr = CIRRDataModule(roots["cirr"])
    data = cirr.split_data("test1")  # the default split
    upload = {"version": "rc2", "metric": "recall"}
    for q in data.queries:
        upload[str(q["pairid"])] = [g for g in data.gallery_ids if g != q["reference_id"]][:50]
    path = tmp_path / "cirr_test1_recall.json"
    path.write_text(json.dumps(upload))
    assert cirr.check_submission(path) == []
    first = str(data.queries[0]["pairid"])
    upload[first] = upload[first][:10]
    path.write_text(json.dumps(upload))
    assert cirr.check_submission(path) == [f"list length is not 50: 1 (e.g. {first}: 10)"]
    assert any("missing pairids" in p for p in cirr.check_submission(path, split="val"))
    path.write_text("{not json")
    assert len(problems := cirr.check_submission(path)) == 1 and "is not valid JSON" in problems[0]
    with pytest.raises(FileNotFoundError, match="submission file not found"):
        cirr.check_submission(tmp_path / "nope.json")

    circo = CIRCODataModule(roots["circo"])
    queries = circo.split_data("test").queries
    path.write_text(json.dumps({str(q["query_id"]): [1, 1] for q in queries}))
    problems = "\n".join(circo.check_submission(path))
    assert "duplicate entries" in problems and "list length is not 50" in problems
    with pytest.raises(ValueError, match="no test server checks fashioniq files"):
        FashionIQDataModule(roots["fashioniq"]).check_submission(path)


def test_missing_annotation_hints_at_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"CIRR caption file not found: .*\(is root the folder of the official"):
        CIRRDataModule(tmp_path).split_data("val")
