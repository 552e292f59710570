"""Write small fake copies of FashionIQ, CIRR and CIRCO in their official layouts.

The copies reproduce what the real downloads contain and what trips evaluation code up: image folders that
hold images no split lists, blank FashionIQ captions, test annotations without targets, CIRR soft labels that
name the reference, CIRCO queries with several ground truths. Images are tiny solid-colour squares with a
random stripe, so a model still sees different pixels for different names.

Usage::

    python tests/data/make_fake_benchmarks.py OUT_DIR [--fashioniq-ext .jpg]

writes ``OUT_DIR/fashioniq``, ``OUT_DIR/cirr`` and ``OUT_DIR/circo``. Tests call :func:`make_all` into
``tmp_path``; nothing generated is committed.
"""

from __future__ import annotations

import argparse
import json
import random
import string
from pathlib import Path

from PIL import Image

CATEGORIES = ("dress", "shirt", "toptee")
ASPECTS = ("cardinality", "addition", "negation", "direct_addressing", "viewpoint")
WORDS = "red blue longer shorter sleeveless striped darker brighter more fewer dogs cats on grass with a hat".split()


def _image(path: Path, rng: random.Random, size: int = 12) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", (size + rng.randrange(4), size), tuple(rng.randrange(256) for _ in range(3)))
    row = rng.randrange(size)
    for x in range(im.width):
        im.putpixel((x, row), tuple(rng.randrange(256) for _ in range(3)))
    im.save(path)


def _sentence(rng: random.Random, n: int = 5) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _dump(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))


def make_fashioniq(root: Path, ext: str = ".png", seed: int = 0, gallery: int = 56, queries: int = 8) -> Path:
    """FashionIQ: ``captions/cap.<cat>.<split>.json``, ``image_splits/split.<cat>.<split>.json``, ``images/``."""
    rng = random.Random(seed)
    root = Path(root)

    def asin() -> str:
        return "B0" + "".join(rng.choice(string.ascii_uppercase + string.digits) for _ in range(8))

    for cat in CATEGORIES:
        for split, n_gallery, n_queries in (("train", 24, 10), ("val", gallery, queries), ("test", gallery, 6)):
            names = [asin() for _ in range(n_gallery)]
            caps = []
            for q in range(n_queries):
                ref, tgt = rng.sample(names, 2)
                c0, c1 = _sentence(rng) + rng.choice([".", "", " ?"]), _sentence(rng, 3)
                if split == "val" and q == 1:
                    c1 = " "  # real val files hold a few blank captions
                if split == "val" and q == 2:
                    c0 = ""
                entry = {"target": tgt, "candidate": ref, "captions": [c0, c1]}
                if split == "test":
                    del entry["target"]  # the test captions have no targets
                caps.append(entry)
            _dump(root / "captions" / f"cap.{cat}.{split}.json", caps)
            _dump(root / "image_splits" / f"split.{cat}.{split}.json", names)
            for name in names:
                _image(root / "images" / f"{name}{ext}", rng)
    for _ in range(5):  # images no split lists: a gallery taken from the folder would be wrong
        _image(root / "images" / f"{asin()}{ext}", rng)
    return root


def make_cirr(root: Path, seed: int = 0, gallery: int = 60, queries: int = 12) -> Path:
    """CIRR: ``cirr/captions``, ``cirr/image_splits`` (name -> ``./dev/...png``), ``train/<n>/``, ``dev/``,
    ``test1/``."""
    rng = random.Random(seed + 1)
    root = Path(root)
    pairid = 1000
    for split, folder, n_gallery, n_queries in (
        ("train", "train", 30, 12),
        ("val", "dev", gallery, queries),
        ("test1", "test1", gallery, queries),
    ):
        names = [f"{folder}-{i // 4}-{i % 4}-img{i % 2}" for i in range(n_gallery)]
        rel = {
            n: f"./{folder}/{i % 3}/{n}.png" if split == "train" else f"./{folder}/{n}.png" for i, n in enumerate(names)
        }
        entries = []
        for q in range(n_queries):
            members = rng.sample(names, 6)
            ref, tgt = members[q % 6], members[(q + 1) % 6]
            soft = {tgt: 1.0}
            if q % 3 == 0:
                soft[members[(q + 2) % 6]] = 0.5
            if q % 4 == 0:
                soft[members[(q + 3) % 6]] = -1.0
            if q == 5:
                soft[ref] = 1.0  # the real val file has soft labels naming the reference
            entry = {
                "pairid": pairid,
                "reference": ref,
                "target_hard": tgt,
                "target_soft": soft,
                "caption": _sentence(rng),
                "img_set": {"id": q // 2, "members": members, "reference_rank": q % 6, "target_rank": (q + 1) % 6},
            }
            if split == "test1":
                for key in ("target_hard", "target_soft"):
                    del entry[key]
                del entry["img_set"]["target_rank"]
            entries.append(entry)
            pairid += 1
        _dump(root / "cirr" / "captions" / f"cap.rc2.{split}.json", entries)
        _dump(root / "cirr" / "image_splits" / f"split.rc2.{split}.json", rel)
        for path in rel.values():
            _image(root / path, rng)
        for i in range(4):  # the folders hold images of no split
            _image(root / folder / f"{folder}-extra-{i}-img0.png", rng)
    return root


def make_circo(root: Path, seed: int = 0, gallery: int = 64, val_queries: int = 6, test_queries: int = 5) -> Path:
    """CIRCO: ``annotations/{val,test}.json`` and ``COCO2017_unlabeled/{annotations,unlabeled2017}``."""
    rng = random.Random(seed + 2)
    root = Path(root)
    ids = sorted(rng.sample(range(1, 600000), gallery))
    coco = root / "COCO2017_unlabeled"
    images = [
        {"license": 1, "file_name": f"{i:012d}.jpg", "coco_url": "", "height": 12, "width": 12, "id": i} for i in ids
    ]
    _dump(coco / "annotations" / "image_info_unlabeled2017.json", {"info": {}, "licenses": [], "images": images})
    for i in ids:
        _image(coco / "unlabeled2017" / f"{i:012d}.jpg", rng)
    _image(coco / "unlabeled2017" / "000000999999.jpg", rng)  # not in the image info: never part of the gallery
    for split, n in (("val", val_queries), ("test", test_queries)):
        entries = []
        for q in range(n):
            ref, *gt = rng.sample(ids, 2 + q % 4)
            entry = {
                "id": q,
                "reference_img_id": ref,
                "target_img_id": gt[0],
                "gt_img_ids": gt,
                "relative_caption": _sentence(rng),
                "shared_concept": rng.choice(["a dog", "a cake", "a bus"]),
                "semantic_aspects": rng.sample(ASPECTS, 1 + q % 2),
            }
            if split == "test":
                entry = {k: entry[k] for k in ("id", "reference_img_id", "relative_caption", "shared_concept")}
            entries.append(entry)
        _dump(root / "annotations" / f"{split}.json", entries)
    return root


def make_all(out: Path, fashioniq_ext: str = ".png") -> dict[str, Path]:
    """Write the three fake benchmarks under ``out``; returns their roots by benchmark name."""
    out = Path(out)
    return {
        "fashioniq": make_fashioniq(out / "fashioniq", ext=fashioniq_ext),
        "cirr": make_cirr(out / "cirr"),
        "circo": make_circo(out / "circo"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder to write fashioniq/, cirr/ and circo/ into")
    parser.add_argument("--fashioniq-ext", default=".png", choices=[".png", ".jpg"], help="FashionIQ image extension")
    args = parser.parse_args()
    for name, root in make_all(args.out, args.fashioniq_ext).items():
        print(f"{name}: {root}")


if __name__ == "__main__":
    main()
