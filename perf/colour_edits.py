"""A control for the zero-shot colour-edit failure (PERFORMANCE.md, "Zero-shot"): train the *supervised* Shapes
quickstart with the benchmark's colour-change sentences replaced by the synthetic grammar's phrasings, and see
whether colour edits still work.

The zero-shot model returns the reference first for most colour edits, and its text encoder maps "remove the red
square" and "remove the blue square" to the same feature. This script separates the two suspects: the synthetic
*images* (renderer, composites, filter) and the synthetic *sentences*. It trains on Shapes' own images and triplets
(no synthesis involved), with only the colour-change templates swapped (``--phrasings grammar``: the seven
recolour templates of ``synthesis/shapes_world.py`` with the benchmark's plain object references), tests on the
unchanged test split (the benchmark's sentences), and prints ``perf/zeroshot_failures.py``'s table for the model.

Usage::

    python perf/colour_edits.py --phrasings grammar     # about 3 min on 2 cores
    python perf/colour_edits.py --phrasings benchmark   # the same run with the benchmark's own templates
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: the grammar's recolour sentences (synthesis/shapes_world.py TEXT_TEMPLATES["recolor"]), with the benchmark's
#: "{color} {shape}" object reference and "{new}" for the new colour
GRAMMAR_RECOLOR = [
    "paint the {color} {shape} {new}",
    "the {color} {shape} turns {new}",
    "recolour the {color} {shape} to {new}",
    "the {color} {shape} becomes {new} instead",
    "please make the {color} {shape} {new}",
    "now change the {color} {shape} to {new}",
    "swap the {color} {shape}'s colour for {new}",
]


def train(phrasings: str, out: Path, extra: list[str]) -> None:
    """Run ``coalign fit --config quickstart`` in this process with the colour-change templates swapped."""
    import coalign.datamodules.shapes as shapes
    from coalign.cli import main

    if phrasings == "grammar":
        # the training split only: records are built per split, and the test split is built after fit with
        # the benchmark's templates restored (ShapesDataModule builds splits lazily, test last)
        benchmark = shapes.TEMPLATES["recolor"]
        original = shapes.ShapesDataModule.build_split

        def build_split(self, split):
            shapes.TEMPLATES["recolor"] = GRAMMAR_RECOLOR if split == "train" else benchmark
            try:
                return original(self, split)
            finally:
                shapes.TEMPLATES["recolor"] = benchmark

        shapes.ShapesDataModule.build_split = build_split
    code = main(
        ["fit", "--config", "configs/quickstart.yaml", "--trainer.default_root_dir", str(out),
         "--trainer.enable_progress_bar", "false", *extra]
    )  # fmt: skip
    if code:
        sys.exit(code)


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phrasings", choices=("grammar", "benchmark"), default="grammar")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default runs/colour_edits_<phrasings>)")
    parser.add_argument("--fit-args", nargs=argparse.REMAINDER, default=[], help="more `coalign fit` flags")
    args = parser.parse_args()
    out = args.out or REPO / "runs" / f"colour_edits_{args.phrasings}"
    train(args.phrasings, out, args.fit_args)
    subprocess.run([sys.executable, str(REPO / "perf" / "zeroshot_failures.py"), str(out / "model")], check=True)


if __name__ == "__main__":
    run()
