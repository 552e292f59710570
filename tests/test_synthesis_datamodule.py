"""CIRHSDataModule reads what ``assemble`` wrote; its sampler keeps same-group triplets together, also under DDP."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from _tiny_synthesis import baseline_dataset, copy_dataset
from lightning.fabric.utilities.data import _replace_dunder_methods, _update_dataloader
from PIL import Image
from torch.utils.data import BatchSampler, DistributedSampler

from coalign.datamodules import CIRHSDataModule
from coalign.datamodules.base import EpochSequentialSampler, GroupedBatchSampler
from coalign.datamodules.cirhs import read_triplets
from coalign.io import read_jsonl


def _to_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im.resize((16, 16)), dtype=np.float32)).permute(2, 0, 1) / 255


def _datamodule(root, **kwargs) -> CIRHSDataModule:
    dm = CIRHSDataModule(root=str(root), batch_size=4, image_transform=_to_tensor, **kwargs)
    dm.setup("fit")
    return dm


def test_reads_the_assembled_dataset_in_the_shared_batch_format():
    dm = _datamodule(baseline_dataset())
    triplets = read_jsonl(baseline_dataset() / "triplets.jsonl")
    assert len(dm.records["train"]) + len(dm.records["val"]) == len(triplets)
    batch = next(iter(dm.train_dataloader()))
    keys = {"reference", "text", "target", "reference_id", "target_id", "group", "index", "target_caption"}
    assert set(batch) == keys
    by_target = {t["target_id"]: t["target_caption"] for t in triplets}  # the LLM's description of each target
    assert batch["target_caption"] == [by_target[t] for t in batch["target_id"]]
    assert batch["reference"].shape == batch["target"].shape == (4, 3, 16, 16)
    assert batch["group"].dtype == torch.long and all(isinstance(t, str) for t in batch["text"])
    assert all(rid.startswith("images/") for rid in batch["reference_id"])  # relative gallery names
    record = dm.records["train"][0]
    assert record["reference_id"] == next(t for t in triplets if t["text"] == record["text"])["reference_id"]


def test_reader_refuses_bad_groups_and_ids_naming_the_line(tmp_path):
    good = {"reference": "a.png", "target": "b.png", "text": "t", "group": 3, "split": "train"}
    for bad, reason in (({"group": "3"}, "groups are ints"), ({"reference_id": 7}, "not an image id")):
        (tmp_path / "triplets.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({**good, **bad}) + "\n")
        with pytest.raises(ValueError, match=f"triplets.jsonl:2 .*{reason}"):
            read_triplets(tmp_path)
    (tmp_path / "triplets.jsonl").write_text(json.dumps({**good, "reference_id": "x", "target_id": "y"}) + "\n")
    [record] = read_triplets(tmp_path)
    assert (record["reference_id"], record["target_id"], record["group"]) == ("x", "y", 3)


@pytest.mark.parametrize("split", ["train", "val"])
def test_batches_hold_chunks_of_group_size(split):
    dm = _datamodule(baseline_dataset(), group_size=4)
    loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
    records = dm.records[split]
    sizes = Counter(r["group"] for r in records)
    seen, together = [], set()
    for batch in loader:
        counts = Counter(batch["group"].tolist())
        assert len(batch["group"]) <= 4
        # chunks are never split: a group's triplets fill its chunk before another group's chunk starts
        assert all(n == min(4, sizes[g]) or n == sizes[g] % 4 for g, n in counts.items()), counts
        together |= {g for g, n in counts.items() if n >= 2}
        seen += batch["index"].tolist()
        ids = [r for r in zip(batch["reference_id"], batch["target_id"], strict=True)]
        assert all(ref != tgt for ref, tgt in ids)
    assert together == {g for g, n in sizes.items() if n >= 2}  # every group meets its soft positives
    assert len(seen) == len(set(seen))
    if split == "val":  # no drop_last in validation: every triplet once
        assert sorted(seen) == list(range(len(dm.records["val"])))


def test_group_size_0_keeps_every_group_whole():
    assert CIRHSDataModule(root="x").group_size == 4  # the default: chunks of 4 (measured better on Shapes)
    groups = [0] * 3 + [1] * 5 + [2] * 2 + [3] * 7 + [4] * 12  # group 4 is larger than a batch: cut at 8
    sampler = GroupedBatchSampler(EpochSequentialSampler(range(len(groups))), 8, False, groups, group_size=0)
    batches = list(sampler)
    assert sorted(sum(batches, [])) == list(range(len(groups)))  # every triplet once
    assert all(len(b) <= 8 for b in batches)
    for g, size in Counter(groups).items():
        holding = [b for b in batches if any(groups[i] == g for i in b)]
        assert len(holding) == (1 if size <= 8 else 2), (g, holding)
    with pytest.raises(ValueError, match="group_size 0 keeps whole groups"):
        GroupedBatchSampler(EpochSequentialSampler(range(4)), 4, True, [0] * 4, group_size=-1)


def test_epochs_reshuffle_and_batch_size_must_fit_groups():
    groups = [i // 2 for i in range(40)]
    sampler = GroupedBatchSampler(EpochSequentialSampler(range(40)), 8, True, groups, group_size=2)
    first = list(sampler)
    sampler.sampler.set_epoch(1)  # what Lightning calls at each epoch
    assert list(sampler) != first and sorted(sum(first, [])) == list(range(40))
    with pytest.raises(ValueError, match="multiple of group_size"):
        CIRHSDataModule(root="x", batch_size=5, group_size=2)


def test_lightning_ddp_injection_gives_each_rank_disjoint_whole_groups():
    groups = [i // 2 for i in range(40)]
    dataset = list(range(40))
    per_rank = []
    for rank in range(2):
        with _replace_dunder_methods(BatchSampler):  # as Lightning does around the datamodule's loader hooks
            sampler = GroupedBatchSampler(EpochSequentialSampler(dataset), 4, True, groups, group_size=2)
            loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler)
        loader = _update_dataloader(loader, DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True))
        batches = list(loader.batch_sampler)
        assert all(set(Counter(groups[i] for i in b).values()) == {2} for b in batches)
        per_rank.append({i for b in batches for i in b})
    assert not per_rank[0] & per_rank[1] and len(per_rank[0] | per_rank[1]) == 40


def test_missing_images_fail_before_training_with_count_and_paths(tmp_path):
    root = copy_dataset(baseline_dataset(), tmp_path / "data")
    gone = sorted(root.glob("images/*/*.png"))[:3]
    for path in gone:
        path.unlink()
    with pytest.raises(FileNotFoundError, match=r"3 of \d+ image files are missing") as err:
        _datamodule(root)
    assert str(gone[0]) in str(err.value)
    with pytest.raises(FileNotFoundError, match="coalign synthesize"):
        _datamodule(tmp_path / "nowhere")


def test_coalign_tiny_fits_on_the_assembled_dataset():
    import lightning as L

    from coalign import create_model

    model = create_model("coalign_tiny")
    dm = CIRHSDataModule(root=str(baseline_dataset()), batch_size=4)
    dm.connect(model.preprocess)  # what the coalign command line does
    trainer = L.Trainer(
        fast_dev_run=True, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer.fit(model, datamodule=dm)
    finally:
        torch.set_num_threads(threads)
    assert trainer.state.finished and torch.isfinite(trainer.callback_metrics["train/loss"])


def test_style_jitter_shifts_each_image_on_its_own_within_its_bound():
    import numpy as np
    from PIL import Image

    from coalign.datamodules import CIRHSDataModule
    from coalign.datamodules.cirhs import StyleJitter

    jitter = StyleJitter(lambda im: np.asarray(im, dtype=np.int64), 0.1)
    image = Image.new("RGB", (4, 4), (100, 150, 200))
    outs = [jitter(image) for _ in range(20)]
    shifts = np.stack([o[0, 0] - np.array([100, 150, 200]) for o in outs])
    assert np.abs(shifts).max() <= 26 and len({tuple(s) for s in shifts}) > 15  # <= 0.1 * 255, and independent
    assert all((o == o[0, 0]).all() for o in outs)  # one offset per channel for the whole image
    with pytest.raises(ValueError, match="style_jitter"):
        CIRHSDataModule("unused", style_jitter=1.5)
