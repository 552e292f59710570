"""Fault injection: corrupt or crafted artefacts give one clear error naming the file, never a raw library error,
and loading stays inert (issue 9)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from coalign import CoAlign, create_model, load_model
from coalign.evaluation.cache import cached_gallery
from coalign.index import Index

TINY = {"image_size": 16, "channels": 4, "stages": 2, "embed_dim": 16, "token_dim": 8, "text_layers": 1}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "m"
    create_model("coalign_tiny", **TINY).save_pretrained(folder)
    return folder


def _edit_config(folder, fn) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    fn(config)
    path.write_text(json.dumps(config))


def test_from_pretrained_ignores_init_from_in_config_json(saved, tmp_path):
    crafted = tmp_path / "crafted"
    crafted.mkdir()
    for name in ("config.json", "model.safetensors"):
        (crafted / name).write_bytes((saved / name).read_bytes())
    # pointing at itself used to recurse forever; a registered name used to download base weights
    for source in (str(crafted), "coalign_blip2_vitg"):
        _edit_config(crafted, lambda c, s=source: c["model"].__setitem__("init_from", s))
        model = CoAlign.from_pretrained(crafted)
        assert model.init_from is None


def test_a_crafted_size_in_config_json_is_refused(saved, tmp_path):
    crafted = tmp_path / "huge"
    crafted.mkdir()
    (crafted / "config.json").write_bytes((saved / "config.json").read_bytes())
    _edit_config(crafted, lambda c: c["model"]["backbone"]["init_args"].__setitem__("embed_dim", 10**12))
    with pytest.raises(ValueError, match=r"model\.backbone\.init_args\.embed_dim = 1000000000000 is outside"):
        CoAlign.from_pretrained(crafted)


def test_corrupt_weights_name_the_file(saved, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((saved / "config.json").read_bytes())
    (broken / "model.safetensors").write_bytes((saved / "model.safetensors").read_bytes()[:100])
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file"):
        CoAlign.from_pretrained(broken)


def test_corrupt_checkpoint_names_the_file_and_never_advises_unpickling(tmp_path):
    ckpt = tmp_path / "run.ckpt"
    ckpt.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    with pytest.raises(ValueError, match="run.ckpt is not a readable coalign Lightning checkpoint") as info:
        load_model(str(ckpt))
    assert "weights_only=False" not in str(info.value)


class _Model(torch.nn.Module):
    """The encoder interface `cached_gallery` needs, with a counter of encoded batches."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.calls = 0

    @property
    def device(self):
        return self.weight.device

    def encode_targets(self, images):
        from coalign import TargetFeatures

        self.calls += 1
        n = len(images)
        return TargetFeatures(torch.ones(n, 1, 4), torch.ones(n, 2, 3))


def test_a_corrupt_gallery_cache_is_rebuilt_with_a_warning(tmp_path):
    model = _Model()
    loader = [{"image": torch.zeros(2, 3, 4, 4), "image_id": ["a", "b"]}]
    entries = [("a", tmp_path / "a.png"), ("b", tmp_path / "b.png")]
    _, path, hit = cached_gallery(model, loader, tmp_path / "cache", entries, progress=False)
    assert not hit and path.is_file()
    path.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="corrupt gallery cache"):
        gallery, _, hit = cached_gallery(model, loader, tmp_path / "cache", entries, progress=False)
    assert not hit and gallery.ids == ["a", "b"] and model.calls == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rewritten: read back without a warning
        assert cached_gallery(model, loader, tmp_path / "cache", entries, progress=False)[2]


def _index(tmp_path, model):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (20, 20), (60 * i, 10, 200)).save(images / f"{i}.png")
    return Index.build(model, images, tmp_path / "idx", progress=False, batch_size=2)


def test_a_malformed_or_corrupt_index_names_what_is_wrong(tmp_path):
    model = create_model("coalign_tiny", **TINY).eval()
    index = _index(tmp_path, model)
    manifest = index.directory / "index.json"
    good = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**good, "shards": "all of them"}))
    with pytest.raises(ValueError, match="'shards' should be a list"):
        Index.load(index.directory)
    manifest.write_text(json.dumps(good))
    shard = next((index.directory / "shards").iterdir())
    shard.write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match=f"index shard .*{shard.name} is missing or corrupt"):
        Index.load(index.directory)


def _fit(args: list[str]) -> int:
    from coalign.cli import main

    try:
        return main(args)
    except SystemExit as exit_:
        return int(exit_.code or 0)


def test_fine_tuning_takes_the_architecture_of_its_source(saved, tmp_path, capsys):
    from PIL import Image

    rows = ["reference,text,target"]
    for i in range(8):
        Image.new("RGB", (20, 20), (30 * i, 100, 200 - 20 * i)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,make it number {i + 1},{(i + 1) % 8}.png")
    (tmp_path / "my.csv").write_text("\n".join(rows) + "\n")
    common = ["fit", "--config", "configs/experiments/finetune_custom.yaml", "--data.path", str(tmp_path / "my.csv"),
              "--data.batch_size", "4", "--data.num_workers", "0", "--data.val_fraction", "0.25",
              "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
              "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
              "--trainer.default_root_dir", str(tmp_path / "run"),
              "--trainer.enable_progress_bar", "false"]  # fmt: skip
    # the YAML names a BLIP-2 backbone; a tiny save_pretrained folder wins, with no model YAML stacked
    assert _fit([*common, "--model.init_from", str(saved)]) == 0
    tuned = CoAlign.from_pretrained(tmp_path / "run" / "model")
    assert tuned.config()["backbone"] == CoAlign.from_pretrained(saved).config()["backbone"]
    capsys.readouterr()
    assert _fit([*common, "--model.init_from", "coalign_tiny"]) == 2  # no published weights: one line, at once
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "coalign_tiny has no published weights" in err[0]


def test_a_triplets_file_stays_inside_its_image_folder_and_names_its_bad_lines(tmp_path):
    from coalign.datamodules import TripletsDataModule
    from coalign.datamodules.triplets import read_triplets_file

    (tmp_path / "imgs").mkdir()
    cases = {
        "outside.csv": ("reference,text,target\n../x.png,make it red,y.png\n", "leaves the image folder"),
        "absolute.csv": ("reference,text,target\n/etc/passwd,make it red,y.png\n", "is an absolute path"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        data = TripletsDataModule(str(tmp_path / name), image_root=str(tmp_path / "imgs"))
        with pytest.raises(ValueError, match=f"{name}:2 \\(reference\\).*{message}"):
            data.setup("fit")
    (tmp_path / "twice.csv").write_text("reference,text,target,text\na.png,red,b.png,blue\n")
    with pytest.raises(ValueError, match=r"names the column\(s\) \['text'\] more than once"):
        read_triplets_file(tmp_path / "twice.csv")
    (tmp_path / "lines.jsonl").write_text('{"reference": "a.png", "text": "red", "target": "b.png"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"lines.jsonl:2 should be a JSON object"):
        read_triplets_file(tmp_path / "lines.jsonl")
    (tmp_path / "latin.csv").write_bytes("reference,text,target\na.png,caf\xe9 au lait,b.png\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin.csv is not UTF-8 text"):
        read_triplets_file(tmp_path / "latin.csv")


def test_check_submission_reports_duplicate_keys_and_deep_nesting(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "data"))
    from make_fake_benchmarks import make_circo

    from coalign.datamodules import CIRCODataModule

    data = CIRCODataModule(make_circo(tmp_path / "circo"))
    twice = tmp_path / "twice.json"
    twice.write_text('{"0": [1], "0": [2]}')
    assert any("appear more than once" in line for line in data.check_submission(twice, "test"))
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    assert any("nested too deeply" in line for line in data.check_submission(deep, "test"))
