"""Where a Shapes model fails: R@1 on the Shapes test split by the benchmark's edit template (PERFORMANCE.md,
"Zero-shot").

Ranks the 600 test queries against the 1,373-image gallery with a trained model (a ``save_pretrained`` folder) and
groups them by the benchmark template that wrote their text (add, remove, recolor, resize, move; "make the X Y" is
shared by colour changes and resizes and is counted as recolor). For each group: queries, R@1, how often the
reference image itself comes first (the model read the text as "no change"), and the mean cosine of the reference's
and the target's image embeddings (near 1: the image encoder barely sees that edit, so no text can separate them).
Then the cosine of the text features of sentences that differ in one word (``--text-probes``): near 1 means the
text encoder ignores that word (a colour, a shape, the order of two colours).

Usage::

    python perf/zeroshot_failures.py runs/ablations_jitter/zeroshot/seed0/model
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict

import torch

from coalign import load_model
from coalign.datamodules import ShapesDataModule
from coalign.datamodules.shapes import TEMPLATES
from coalign.evaluation.engine import encode_gallery

_PATTERNS = [
    (kind, re.compile("^" + re.sub(r"\\\{\w+\\\}", ".+", re.escape(template)) + "$"))
    for kind, templates in TEMPLATES.items()
    for template in templates
]


def edit_kind(text: str) -> str:
    """The first benchmark edit whose template matches ``text`` ("?" when none does)."""
    return next((kind for kind, pattern in _PATTERNS if pattern.match(text)), "?")


#: pairs of modification texts that differ in one word or in the order of two colours
TEXT_PROBES = [
    ("paint the red square blue", "paint the blue square red"),
    ("make the red square blue", "make the blue square red"),
    ("remove the red square", "remove the blue square"),
    ("remove the red square", "remove the red circle"),
    ("move the red square to the left", "move the red square to the right"),
]


@torch.no_grad()
def text_probes(model) -> list[tuple[str, str, float]]:
    """``(a, b, cosine of the backbone's text features of a and b)`` for each of :data:`TEXT_PROBES` (a backbone
    with a separate text tower: ``TinyBackbone``)."""
    out = []
    for a, b in TEXT_PROBES:
        tokens = model.backbone.tokenize([a, b])
        features = model.backbone._encode_text(tokens["input_ids"], tokens["attention_mask"])
        out.append((a, b, torch.nn.functional.cosine_similarity(features[0], features[1], dim=0).item()))
    return out


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a save_pretrained folder (or any load_model source)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model).eval()
    data = ShapesDataModule(image_size=model.preprocess.size, num_train_sources=0)
    data.connect(model.preprocess)
    data.setup("test")
    gallery = encode_gallery(model, data.evaluation_task("test").gallery, progress=False)
    position = {image_id: i for i, image_id in enumerate(gallery.ids)}
    records = data.build_split("test")[0]
    dataset = data._triplets("test")
    hits, reference_first, closeness = defaultdict(list), defaultdict(list), defaultdict(list)
    for start in range(0, len(dataset), 100):
        items = [dataset[i] for i in range(start, min(len(dataset), start + 100))]
        queries = model.encode_queries(torch.stack([it["reference"] for it in items]), [it["text"] for it in items])
        best = model.similarity(queries, gallery.features).argmax(dim=1).tolist()
        reference = model.encode_targets(torch.stack([it["reference"] for it in items])).embedding
        target = model.encode_targets(torch.stack([it["target"] for it in items])).embedding
        cosines = (reference * target).sum(-1).amax(-1).tolist()  # single-vector targets: K = 1
        for record, top, cosine in zip(records[start : start + 100], best, cosines):
            kind = edit_kind(record["text"])
            closeness[kind].append(cosine)
            hits[kind].append(top == position[record["target_id"]])
            reference_first[kind].append(top == position[record["reference_id"]])
    print(f"{'edit':<8} {'queries':>7} {'R@1':>6} {'reference first':>16} {'cos(reference, target)':>23}")
    for kind in sorted(hits, key=lambda k: -sum(hits[k]) / len(hits[k])):
        n = len(hits[kind])
        print(
            f"{kind:<8} {n:>7} {100 * sum(hits[kind]) / n:>6.1f} {100 * sum(reference_first[kind]) / n:>15.1f}% "
            f"{sum(closeness[kind]) / n:>23.3f}"
        )
    if hasattr(model.backbone, "_encode_text"):
        print("\ntext features: cosine  sentence a | sentence b")
        for a, b, cosine in text_probes(model):
            print(f"  {cosine:6.3f}  {a} | {b}")


if __name__ == "__main__":
    main()
