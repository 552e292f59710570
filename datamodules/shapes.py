"""Shapes: a procedural CIR benchmark of coloured shapes on a grid, in the spirit of CSS (Vo et al., 2019).

A scene is a few objects (shape, colour, size) in distinct cells of a 3 x 3 grid; no two objects share a
(colour, shape), so "the red circle" always names one object. A query is a scene plus an edit that adds,
removes, recolours, resizes or moves one object; its target is the edited scene. Everything is a pure function
of the seed, so every split is reproducible and needs no download.

The held-out gallery is built to punish models that return "something like the reference": for every query
it holds the reference itself, the target, the other edits of the same source scene, and ``distractors`` scenes
that differ from the *target* by one further edit. Only a model that reads the text and applies it to the
reference ranks the target first.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from coalign.evaluation.evaluator import TargetRecall

from .base import CIRDataModule, GalleryDataset, TripletDataset

__all__ = ["ShapesDataModule", "ShapesWorld", "Scene"]

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (150, 60, 190),
    "cyan": (40, 200, 210),
}
SIZES = ("small", "large")
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
EDITS = ("add", "remove", "recolor", "resize", "move")
TEMPLATES = {
    "add": ["add a {size} {color} {shape} at the {pos}", "put a {size} {color} {shape} in the {pos}"],
    "remove": ["remove the {color} {shape}", "take away the {color} {shape}"],
    "recolor": ["make the {color} {shape} {new}", "change the {color} {shape} to {new}"],
    "resize": ["make the {color} {shape} {new}", "the {color} {shape} should be {new}"],
    "move": ["move the {color} {shape} to the {pos}", "put the {color} {shape} at the {pos}"],
}

Obj = tuple[str, str, str, int]  # (shape, colour, size, cell)


@dataclass(frozen=True)
class Scene:
    """A set of objects; its ``key`` is a canonical string that names the image."""

    objects: tuple[Obj, ...]

    @property
    def key(self) -> str:
        return ";".join(f"{c}-{s}-{z[0]}@{p}" for s, c, z, p in sorted(self.objects, key=lambda o: o[3]))


class ShapesWorld:
    """Scene sampling, edits and rendering.

    Args:
        image_size: side of the rendered images in pixels.
        min_objects: fewest objects in a source scene.
        max_objects: most objects in a source scene.
    """

    def __init__(self, image_size: int = 32, min_objects: int = 2, max_objects: int = 4):
        self.image_size = image_size
        self.min_objects = min_objects
        self.max_objects = max_objects

    def sample_scene(self, rng: random.Random) -> Scene:
        n = rng.randint(self.min_objects, self.max_objects)
        kinds = rng.sample([(s, c) for s in SHAPES for c in COLORS], n)
        cells = rng.sample(range(len(POSITIONS)), n)
        return Scene(tuple((s, c, rng.choice(SIZES), p) for (s, c), p in zip(kinds, cells)))

    def edit(self, scene: Scene, rng: random.Random, kind: str | None = None) -> tuple[Scene, str, str] | None:
        """Apply one random edit; returns ``(new scene, text, inverse text)`` or None if ``kind`` is impossible.

        The inverse text turns the new scene back into ``scene`` ("add a small red circle at the top" <->
        "remove the red circle").
        """
        objs = list(scene.objects)
        kind = kind or rng.choice(EDITS)
        used_cells = {o[3] for o in objs}
        free_cells = [p for p in range(len(POSITIONS)) if p not in used_cells]
        used_kinds = {(o[0], o[1]) for o in objs}

        def say(k: str, **fields: str) -> str:
            return rng.choice(TEMPLATES[k]).format(**fields)

        if kind == "add":
            free_kinds = [(s, c) for s in SHAPES for c in COLORS if (s, c) not in used_kinds]
            if not free_cells or len(objs) >= len(POSITIONS) - 1:
                return None
            s, c = rng.choice(free_kinds)
            z, p = rng.choice(SIZES), rng.choice(free_cells)
            objs.append((s, c, z, p))
            return (
                Scene(tuple(objs)),
                say("add", size=z, color=c, shape=s, pos=POSITIONS[p]),
                say("remove", color=c, shape=s),
            )
        if not objs or (kind == "remove" and len(objs) <= 1):
            return None
        i = rng.randrange(len(objs))
        s, c, z, p = objs[i]
        if kind == "remove":
            objs.pop(i)
            forward = say("remove", color=c, shape=s)
            backward = say("add", size=z, color=c, shape=s, pos=POSITIONS[p])
        elif kind == "recolor":
            options = [n for n in COLORS if (s, n) not in used_kinds]
            if not options:
                return None
            new = rng.choice(options)
            objs[i] = (s, new, z, p)
            forward, backward = say("recolor", color=c, shape=s, new=new), say("recolor", color=new, shape=s, new=c)
        elif kind == "resize":
            new = "small" if z == "large" else "large"
            objs[i] = (s, c, new, p)
            forward, backward = say("resize", color=c, shape=s, new=new), say("resize", color=c, shape=s, new=z)
        else:  # move
            if not free_cells:
                return None
            new_p = rng.choice(free_cells)
            objs[i] = (s, c, z, new_p)
            forward = say("move", color=c, shape=s, pos=POSITIONS[new_p])
            backward = say("move", color=c, shape=s, pos=POSITIONS[p])
        return Scene(tuple(objs)), forward, backward

    def random_edit(self, scene: Scene, rng: random.Random) -> tuple[Scene, str, str]:
        """Like :meth:`edit` with a kind that applies to ``scene``."""
        for _ in range(20):
            out = self.edit(scene, rng)
            if out is not None:
                return out
        raise RuntimeError(f"no edit applies to scene {scene.key}")  # unreachable for 1..8 objects

    def render(self, scene: Scene) -> Image.Image:
        n = self.image_size
        image = Image.new("RGB", (n, n), (245, 245, 240))
        draw = ImageDraw.Draw(image)
        cell = n / 3
        for shape, color, size, p in scene.objects:
            r, c = divmod(p, 3)
            cx, cy = (c + 0.5) * cell, (r + 0.5) * cell
            half = cell * (0.45 if size == "large" else 0.25)
            box = (cx - half, cy - half, cx + half, cy + half)
            fill = COLORS[color]
            if shape == "circle":
                draw.ellipse(box, fill=fill)
            elif shape == "square":
                draw.rectangle(box, fill=fill)
            else:
                draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
        return image


class _RenderedTriplets(Dataset):
    """Triplet records holding scenes; images are rendered lazily in the loader workers."""

    def __init__(self, world: ShapesWorld, records: list[dict], transform):
        self.world = world
        self.records = records
        self.inner = TripletDataset([], transform)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        r = dict(self.records[i])
        r["reference_image"] = self.world.render(r.pop("reference_scene"))
        r["target_image"] = self.world.render(r.pop("target_scene"))
        if "negative_scene" in r:
            r["negative_image"] = self.world.render(r.pop("negative_scene"))
        self.inner.records = [r]
        return self.inner[0]


class ShapesDataModule(CIRDataModule):
    """Procedural compositional-retrieval benchmark that needs no download.

    Train triplets are drawn fresh from the training seed; val and test each have their own source scenes and
    a gallery of at least ``num_eval_sources * (1 + edits_per_source * (1 + distractors))`` images before
    de-duplication. Groups are the several edits of one source scene (soft positives for the global head).

    Args:
        image_size: side of the rendered images in pixels.
        num_train_sources: source scenes in the training split.
        num_eval_sources: source scenes in each of val and test.
        edits_per_source: edits (triplets) per source scene; they form one group.
        distractors: one-edit-from-the-target look-alikes added to the gallery per query.
        group_size: triplets of one group placed together in a training batch.
        bidirectional: also train on each edit reversed (target -> reference with the inverse text), as CIRHS
            does; the reference of one triplet is then the target of another in the same batch, a hard negative.
        hard_negatives: give every training triplet a look-alike of its target (one more edit away) as a hard
            negative (the ``negative`` batch key), the kind of image the test gallery is full of.
        seed: base seed; train, val and test use ``seed``, ``seed + 1`` and ``seed + 2``.
        batch_size: triplets per batch.
        num_workers: loader worker processes.
        image_transform: callable PIL -> tensor; None takes the model's ``preprocess``.
    """

    has_gallery = True

    def __init__(
        self,
        image_size: int = 32,
        num_train_sources: int = 4000,
        num_eval_sources: int = 200,
        edits_per_source: int = 3,
        distractors: int = 1,
        group_size: int = 4,
        bidirectional: bool = True,
        hard_negatives: bool = True,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        image_transform=None,
    ):
        super().__init__(batch_size=batch_size, num_workers=num_workers, image_transform=image_transform)
        self.world = ShapesWorld(image_size)
        self.num_train_sources = num_train_sources
        self.num_eval_sources = num_eval_sources
        self.edits_per_source = edits_per_source
        self.distractors = distractors
        self.group_size = group_size
        self.bidirectional = bidirectional
        self.hard_negatives = hard_negatives
        self.seed = seed
        self._splits: dict[str, tuple[list[dict], list[Scene]]] = {}

    def build_split(self, split: str) -> tuple[list[dict], list[Scene]]:
        """Triplet records and gallery scenes of ``split`` ("train", "val" or "test"); deterministic."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"unknown split {split!r}; valid splits: train, val, test")
        if split in self._splits:
            return self._splits[split]
        offset = {"train": 0, "val": 1, "test": 2}[split]
        rng = random.Random(self.seed * 1000 + offset)
        n_sources = self.num_train_sources if split == "train" else self.num_eval_sources
        records: list[dict] = []
        gallery: dict[str, Scene] = {}
        for g in range(n_sources):
            source = self.world.sample_scene(rng)
            gallery[source.key] = source
            kinds = rng.sample(EDITS, min(self.edits_per_source, len(EDITS)))
            for kind in kinds:
                target, forward, backward = self.world.edit(source, rng, kind) or self.world.random_edit(source, rng)
                if target.key == source.key:
                    continue
                pairs = [(source, forward, target)]
                if split == "train" and self.bidirectional:
                    pairs.append((target, backward, source))
                for reference, text, goal in pairs:
                    record = {
                        "reference_scene": reference,
                        "target_scene": goal,
                        "reference_id": reference.key,
                        "target_id": goal.key,
                        "text": text,
                        "group": g,
                        "index": len(records),
                    }
                    if split == "train" and self.hard_negatives:
                        look_alike = self.world.random_edit(goal, rng)[0]
                        record.update(negative_scene=look_alike, negative_id=look_alike.key)
                    records.append(record)
                gallery[target.key] = target
                if split != "train":
                    for _ in range(self.distractors):
                        look_alike = self.world.random_edit(target, rng)[0]
                        gallery.setdefault(look_alike.key, look_alike)
        self._splits[split] = (records, list(gallery.values()))
        return self._splits[split]

    def setup(self, stage: str | None = None) -> None:
        for split in ("train", "val", "test"):
            self.build_split(split)

    def _triplets(self, split: str) -> _RenderedTriplets:
        return _RenderedTriplets(self.world, self.build_split(split)[0], self.transform)

    def train_dataloader(self):
        dataset = self._triplets("train")
        return self.grouped_loader(dataset, [r["group"] for r in dataset.records], self.group_size, self.seed)

    def val_dataloader(self):
        return self._loader(self._triplets("val"))

    def test_dataloader(self):
        return self._loader(self._triplets("test"))

    def gallery_dataset(self, split: str) -> GalleryDataset:
        scenes = self.build_split(split)[1]
        return _RenderedGallery(self.world, scenes, self.transform)

    def build_evaluator(self, split: str) -> TargetRecall:
        return TargetRecall([scene.key for scene in self.build_split(split)[1]], ks=(1, 5, 10, 50), prefix="shapes/")


class _RenderedGallery(GalleryDataset):
    def __init__(self, world: ShapesWorld, scenes: list[Scene], transform):
        super().__init__([(s.key, s) for s in scenes], transform)
        self.world = world

    def __getitem__(self, i: int) -> dict:
        key, scene = self.entries[i]
        return {"image": self.transform(self.world.render(scene)), "image_id": key}
