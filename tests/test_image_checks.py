"""Fail before the first step: every image a run reads is decoded in `setup`, every bad file is listed at once."""

import contextlib
import io
import json
import sys
import warnings
from pathlib import Path

import pytest
from PIL import Image

from coalign.datamodules import CIRRDataModule, TripletsDataModule
from coalign.datamodules.images import find_bad_images, image_check_cache, image_problem
from coalign.io import load_image

sys.path.insert(0, str(Path(__file__).parent / "data"))
from make_fake_benchmarks import make_cirr  # noqa: E402


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COALIGN_CACHE_DIR", str(tmp_path / "cache"))


def _png(path: Path, color=(200, 10, 10), size=(8, 8)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path.name


def _triplets(tmp_path: Path, n: int = 8) -> Path:
    names = [_png(tmp_path / f"im{i}.png", (30 * i, 0, 0)) for i in range(n)]
    rows = ["reference,text,target,split"] + [
        f"{names[i]},make it {i},{names[(i + 1) % n]},{'val' if i == 0 else 'train'}" for i in range(n)
    ]
    (tmp_path / "mine.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "mine.csv"


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:60])


def _module(path: Path, **kwargs) -> TripletsDataModule:
    return TripletsDataModule(str(path), batch_size=2, image_transform=lambda im: im, **kwargs)


def test_every_bad_image_is_listed_at_once_with_its_row(tmp_path):
    path = _triplets(tmp_path)
    _truncate(tmp_path / "im3.png")
    (tmp_path / "im5.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"2 of 8 image files cannot be decoded") as err:
        _module(path).setup("fit")
    message = str(err.value)
    assert f"{tmp_path / 'im3.png'} (mine.csv line 4)" in message  # the first row that names it
    assert f"{tmp_path / 'im5.png'} (mine.csv line 6)" in message
    assert "skip_bad_images" in message


def test_skip_bad_images_drops_and_counts_the_triplets_that_need_them(tmp_path):
    path = _triplets(tmp_path)
    _truncate(tmp_path / "im3.png")
    module = _module(path)
    module.skip_bad_images = True
    with pytest.warns(UserWarning, match=r"1 of 8 image files .* dropped the 2 of 8 triplets"):
        module.setup("fit")
    used = {r[k] for split in module.records.values() for r in split for k in ("reference", "target")}
    assert str(tmp_path / "im3.png") not in used and len(module.records["train"]) == 5


def test_checked_images_are_remembered_by_size_and_mtime(tmp_path, monkeypatch):
    paths = [str(tmp_path / _png(tmp_path / f"a{i}.png")) for i in range(3)]
    assert find_bad_images(paths, progress=False) == {}
    cache = json.loads(image_check_cache().read_text())
    assert sorted(cache[str(tmp_path)]) == ["a0.png", "a1.png", "a2.png"]
    decoded = []
    monkeypatch.setattr("coalign.datamodules.images.image_problem", lambda p: decoded.append(p))
    assert find_bad_images(paths, progress=False) == {} and decoded == []  # the second run decodes nothing
    _png(tmp_path / "a1.png", size=(9, 9))  # a changed file is checked again
    find_bad_images(paths, progress=False)
    assert decoded == [paths[1]]


def test_image_problem_names_truncated_empty_and_oversized_images(tmp_path, monkeypatch):
    _png(tmp_path / "ok.png")
    _png(tmp_path / "cut.png")
    _truncate(tmp_path / "cut.png")
    (tmp_path / "empty.png").write_bytes(b"")
    assert image_problem(tmp_path / "ok.png") is None
    assert image_problem(tmp_path / "cut.png") and image_problem(tmp_path / "empty.png")
    assert image_problem(tmp_path / "gone.png") == "file not found"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert "decompression bomb" in image_problem(tmp_path / "ok.png")
        with pytest.raises(OSError, match=r"cannot read image .*ok\.png: .*8x8 pixels.*decompression bomb"):
            load_image(tmp_path / "ok.png")


def test_benchmark_splits_are_decoded_before_evaluation(tmp_path):
    root = make_cirr(tmp_path / "cirr")
    split = json.loads((root / "cirr" / "image_splits" / "split.rc2.val.json").read_text())
    bad = root / next(iter(split.values()))
    _truncate(bad)
    with pytest.raises(ValueError, match=r"1 of \d+ cirr val image files cannot be decoded") as err:
        with contextlib.redirect_stderr(io.StringIO()):
            CIRRDataModule(root).prepare_split("val")
    assert str(bad) in str(err.value) and "image id" in str(err.value)
    module = CIRRDataModule(root, image_transform=lambda im: im)
    module.skip_bad_images = True  # applies to the training split only: metrics need the whole split
    with pytest.raises(ValueError, match="cannot be decoded"):
        module.prepare_split("val")
