"""CIRHS in the Hub's format: parquet shards (one row per group) that ``datasets.load_dataset`` reads, the card's
``configs:``, ``push_to_hub``, and ``CIRHSDataModule`` over a parquet folder, a Hub id and a stream. All offline."""

from __future__ import annotations

import fnmatch
import hashlib
import shutil
import sys
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from _tiny_synthesis import baseline_dataset, copy_dataset, run_tiny, tiny_config
from huggingface_hub import DatasetCard
from PIL import Image

from coalign.datamodules import CIRHSDataModule
from coalign.datamodules.cirhs import StreamingTriplets
from coalign.io import read_json, read_jsonl
from coalign.synthesis import DATASET_FILES
from coalign.synthesis.assemble import push_to_hub


def _to_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1) / 255


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((folder / "data").glob("*"))}


def _hub_only(src: Path, dst: Path) -> Path:
    """What ``push_to_hub`` uploads, alone in a folder: parquet shards and the card, no triplets.jsonl/images."""
    dst.mkdir(parents=True)
    shutil.copytree(src / "data", dst / "data")
    shutil.copy(src / "README.md", dst / "README.md")
    return dst


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """The baseline re-assembled with tiny shards (about one group each), in a folder of its own."""
    out = copy_dataset(baseline_dataset(), tmp_path_factory.mktemp("sharded") / "out")
    (out / "data" / "train-00007-of-00009.parquet").write_bytes(b"a stale shard of an earlier assemble")
    run_tiny(out, tiny_config("--assemble.parquet_shard_mb", "0.00002"), stages=("assemble",))
    return out


def test_load_dataset_reads_one_row_per_group_that_expands_to_triplets_jsonl(tmp_path):
    out = baseline_dataset()
    dataset = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "cache"))
    assert set(dataset) == {"train", "val"}
    triplets = read_jsonl(out / "triplets.jsonl")
    rebuilt = []
    for split in ("train", "val"):
        for row in dataset[split]:
            assert all(isinstance(p, Image.Image) for p in row["panels"])  # decoded by the Image feature
            assert row["panel_ids"][0].endswith("_p0.png") and len(row["captions"]) == len(row["panels"])
            for k, panel in enumerate(row["panels"]):  # the very pixels of the loose image files
                assert np.array_equal(np.asarray(panel), np.asarray(Image.open(out / row["panel_ids"][k])))
            for t in row["triplets"]:
                ref, tgt = row["panel_ids"][t["reference"]], row["panel_ids"][t["target"]]
                captions = row["captions"][t["reference"]], row["captions"][t["target"]]
                rebuilt.append((t["id"], ref, tgt, t["text"], row["group"], split, t["direction"], *captions))
    keys = ("id", "reference_id", "target_id", "text", "group", "split", "direction")
    expected = [tuple(t[k] for k in keys) + (t["reference_caption"], t["target_caption"]) for t in triplets]
    assert sorted(rebuilt) == sorted(expected)
    assert sum(dataset[s].num_rows for s in dataset) == read_json(out / "stats.json")["counts"]["groups_kept"]


def test_card_names_configs_splits_and_row_counts():
    out = baseline_dataset()
    card = DatasetCard.load(out / "README.md")
    counts = read_json(out / "stats.json")["counts"]
    [config] = card.data.configs
    assert config["config_name"] == "default"
    assert config["data_files"] == [
        {"split": "train", "path": "data/train-*.parquet"},
        {"split": "val", "path": "data/val-*.parquet"},
    ]
    splits = {s["name"]: s for s in card.data.dataset_info["splits"]}
    assert splits["train"]["num_examples"] == counts["groups_train"] and counts["groups_train"] > 0
    assert splits["val"]["num_examples"] == counts["groups_val"] and counts["groups_val"] > 0
    assert splits["train"]["num_bytes"] == (out / "data" / "train-00000-of-00001.parquet").stat().st_size
    assert card.data.size_categories == ["n<1K"] and "composed-image-retrieval" in card.data.tags
    assert card.data.task_categories == ["image-to-image"] and card.data.license == "other"
    assert "data/train-00000-of-00001.parquet" in card.text and "load_dataset" in card.text


def test_shards_are_bitwise_reproducible_in_another_folder_and_stale_ones_go(tmp_path, sharded):
    # another folder, re-assembled from the same stage outputs: the same bytes (no path or time in the files)
    out = copy_dataset(baseline_dataset(), tmp_path / "again")
    shutil.rmtree(out / "data")
    run_tiny(out, stages=("assemble",))
    assert _hashes(out) == _hashes(baseline_dataset())
    # a rerun with unchanged rows leaves the shards alone; the stale shard of another layout is gone
    names = sorted(p.name for p in (sharded / "data").glob("*.parquet"))
    counts = read_json(sharded / "stats.json")["counts"]
    assert len(names) == counts["groups_kept"] and "train-00007-of-00009.parquet" not in names
    assert f"train-00000-of-{counts['groups_train']:05d}.parquet" in names
    assert not list((sharded / "data").glob(".tmp-*"))
    card = DatasetCard.load(sharded / "README.md")
    assert all(name in card.text for name in names)


def test_several_shards_read_back_to_the_same_rows(tmp_path, sharded):
    one = datasets.load_dataset(str(baseline_dataset()), cache_dir=str(tmp_path / "a"))
    many = datasets.load_dataset(str(sharded), cache_dir=str(tmp_path / "b"))
    for split in ("train", "val"):
        assert many[split].num_rows == one[split].num_rows
        assert many[split]["group"] == one[split]["group"] == sorted(one[split]["group"])  # id order
        assert many[split]["triplets"] == one[split]["triplets"]


class FakeHfApi:
    """Records the Hub calls ``push_to_hub`` makes (no network)."""

    calls: list[tuple[str, dict]] = []

    def __init__(self, token=None):
        self.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        return "https://huggingface.co/datasets/me/cirhs/commit/abc"


def test_push_to_hub_uploads_the_shards_and_card_only(monkeypatch, tmp_path):
    import huggingface_hub

    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    out = baseline_dataset()
    url = push_to_hub(out, "me/cirhs", private=True, token="t")
    assert url.endswith("/commit/abc")
    assert FakeHfApi.calls[1] == (
        "create_repo",
        {"repo_id": "me/cirhs", "repo_type": "dataset", "private": True, "exist_ok": True},
    )
    upload = FakeHfApi.calls[2][1]
    assert upload["repo_id"] == "me/cirhs" and upload["repo_type"] == "dataset"
    assert upload["allow_patterns"] == DATASET_FILES
    files = [str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()]
    sent = sorted(f for f in files if any(fnmatch.fnmatch(f, pattern) for pattern in DATASET_FILES))
    shards = sorted(str(p.relative_to(out)) for p in (out / "data").glob("*.parquet"))
    assert sent == sorted(["README.md", "preview.png", "stats.json", *shards])
    # without shards (no `datasets` when it was assembled) there is nothing in the Hub's format to push
    bare = copy_dataset(out, tmp_path / "bare")
    shutil.rmtree(bare / "data")
    with pytest.raises(FileNotFoundError, match=r"no parquet shards.*coalign\[hub\].*--stage assemble"):
        push_to_hub(bare, "me/cirhs")


def _batches(loader) -> list[dict]:
    return [batch for batch in loader]


def test_parquet_folder_gives_the_batches_of_triplets_jsonl(tmp_path):
    kwargs = {"batch_size": 4, "group_size": 2, "image_transform": _to_tensor, "seed": 3}
    jsonl = CIRHSDataModule(root=str(baseline_dataset()), **kwargs)
    parquet = CIRHSDataModule(
        root=str(_hub_only(baseline_dataset(), tmp_path / "hub")), cache_dir=str(tmp_path / "cache"), **kwargs
    )
    for dm in (jsonl, parquet):
        dm.setup("fit")
    keys = ("reference_id", "target_id", "text", "group", "split", "index", "direction", "target_caption")
    for split in ("train", "val"):
        assert [[r[k] for k in keys] for r in parquet.records[split]] == [
            [r[k] for k in keys] for r in jsonl.records[split]
        ]
    for a, b in zip(
        _batches(jsonl.train_dataloader()) + _batches(jsonl.val_dataloader()),
        _batches(parquet.train_dataloader()) + _batches(parquet.val_dataloader()),
        strict=True,
    ):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key], key


def test_a_hub_id_goes_to_load_dataset_and_errors_say_what_was_expected(monkeypatch, tmp_path):
    calls = []
    local = str(_hub_only(baseline_dataset(), tmp_path / "hub"))
    real = datasets.load_dataset

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs["streaming"]))
        if path != "me/cirhs":
            raise datasets.exceptions.DatasetNotFoundError(f"Dataset '{path}' doesn't exist on the Hub")
        return real(local, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dm = CIRHSDataModule(root="me/cirhs", batch_size=4, image_transform=_to_tensor, cache_dir=str(tmp_path / "c"))
    dm.setup("fit")
    assert calls == [("me/cirhs", False)] and len(dm.records["train"]) > 0
    assert next(iter(dm.train_dataloader()))["reference"].shape == (4, 3, 8, 8)
    with pytest.raises(FileNotFoundError, match=r"cannot load me/nothing .*DatasetNotFoundError.*owner/name"):
        CIRHSDataModule(root="me/nothing").setup("fit")
    with pytest.raises(FileNotFoundError, match=r"neither a folder with triplets.jsonl .* nor a Hub dataset id"):
        CIRHSDataModule(root=str(tmp_path / "missing")).setup("fit")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a folder"):
        CIRHSDataModule(root=str(tmp_path / "empty")).setup("fit")
    jsonl_only = tmp_path / "jsonl"
    jsonl_only.mkdir()
    shutil.copy(baseline_dataset() / "triplets.jsonl", jsonl_only / "triplets.jsonl")
    with pytest.raises(FileNotFoundError, match=r"no data/\*.parquet: streaming reads the parquet shards"):
        CIRHSDataModule(root=str(jsonl_only), streaming=True).setup("fit")


def test_jsonl_needs_no_datasets_and_parquet_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    dm = CIRHSDataModule(root=str(baseline_dataset()), batch_size=4, image_transform=_to_tensor)
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))["group"].shape == (4,)
    with pytest.raises(ImportError, match=r'pip install "coalign\[hub\]"'):
        CIRHSDataModule(root=str(_hub_only(baseline_dataset(), tmp_path / "hub"))).setup("fit")


def _stream(root: Path, **kwargs) -> CIRHSDataModule:
    kwargs = {"batch_size": 4, "group_size": 2, "image_transform": _to_tensor, "shuffle_buffer": 3, **kwargs}
    dm = CIRHSDataModule(root=str(root), streaming=True, **kwargs)
    dm.setup("fit")
    return dm


def _seen(batches) -> list[tuple[str, str, int]]:
    return [(r, t, g) for b in batches for r, t, g in zip(b["reference_id"], b["target_id"], b["group"].tolist())]


def test_streaming_epochs_cover_the_train_split_with_group_chunks(sharded):
    train = [t for t in read_jsonl(sharded / "triplets.jsonl") if t["split"] == "train"]
    everything = sorted((t["reference_id"], t["target_id"], t["group"]) for t in train)
    sizes = Counter(t["group"] for t in train)
    dm = _stream(sharded)
    loader = dm.train_dataloader()
    epochs = [_batches(loader), _batches(loader)]  # the loader counts epochs without a trainer
    for batches in epochs:
        seen = _seen(batches)
        assert len(seen) == len(set(seen)) and set(seen) <= set(everything)
        assert len(everything) - len(seen) < 4  # drop_last: at most the last incomplete batch is left out
        for batch in batches:
            assert len(batch["group"]) <= 4  # a batch closes early when the next chunk does not fit, as in the sampler
            for group, n in Counter(batch["group"].tolist()).items():  # whole chunks of 2 (or a group's odd one)
                assert n % 2 == 0 or sizes[group] % 2 == 1, (group, n)
        together = Counter((b_i, g) for b_i, b in enumerate(batches) for g in b["group"].tolist())
        assert {g for (_, g), n in together.items() if n >= 2} == {g for g, n in sizes.items() if n >= 2}
    assert _seen(epochs[0]) != _seen(epochs[1])  # a new order every epoch
    assert _seen(_batches(_stream(sharded).train_dataloader())) == _seen(epochs[0])  # seeded: reproducible
    assert _seen(_batches(_stream(sharded, seed=1).train_dataloader())) != _seen(epochs[0])
    # without drop_last (here: validation over the train split, in order) every triplet exactly once
    in_order = _seen(_batches(_stream(sharded, val_split="train", num_workers=2).val_dataloader()))
    assert sorted(in_order) == everything


def test_streaming_ranks_yield_the_same_number_of_batches(sharded):
    dm = _stream(sharded)
    per_rank = []
    for rank in range(2):
        dataset: StreamingTriplets = dm.train_dataloader().dataset
        dataset.rank, dataset.world_size = rank, 2
        dm._prepare_stream(dataset, 0)
        per_rank.append(list(dataset))
    n_train = sum(1 for t in read_jsonl(sharded / "triplets.jsonl") if t["split"] == "train")
    assert len(per_rank[0]) == len(per_rank[1]) == n_train // (4 * 2) > 0
    groups = [{g for b in batches for g in b["group"].tolist()} for batches in per_rank]
    assert groups[0] and groups[1] and not groups[0] & groups[1]  # each rank its own groups


def test_coalign_tiny_fits_on_a_stream(sharded):
    import lightning as L

    from coalign import create_model

    model = create_model("coalign_tiny")
    dm = CIRHSDataModule(root=str(sharded), batch_size=4, streaming=True)
    dm.connect(model.preprocess)
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer.fit(model, datamodule=dm)
    finally:
        torch.set_num_threads(threads)
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train/loss"])
