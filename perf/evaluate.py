"""Evaluation benchmarks (results in PERFORMANCE.md, section "Evaluation").

(a) Overhead of a whole evaluation. A synthetic CIRR-val-sized benchmark (2,297 gallery images, 4,181
    queries, small PNGs in the official CIRR layout) is evaluated with ``coalign_clip_vitb32`` (random weights)
    through :func:`coalign.evaluation.evaluate` (loading and decoding images, encoding, ranking the full
    gallery, metrics, writing the gallery cache and the upload files). The time spent inside the bare
    backbone (``tokenize``, ``encode_target``, ``encode_query``) is measured in the same run, so machine
    noise hits both alike; the rest is what data loading, caching and metrics add. Budget: at most +10%.
    ``--separate-baseline`` also times a second pass that only encodes the same images and texts with the bare
    backbone from tensors already in memory.
(b) Peak memory of ranking 4,181 queries against a 123,403 x 32 x 256 fp16 gallery (CIRCO's size with
    BLIP-2's 32 Q-Former embeddings), in a fresh process; measured as the peak resident memory above what the
    process held before the gallery was allocated, divided by the gallery's bytes. Budget: at most 1.5x.

Usage::

    python perf/evaluate.py [--image-size 224] [--max-length 77] [--b-queries 4181] [--skip-a] [--skip-b]
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import coalign
from coalign import QueryFeatures, TargetFeatures
from coalign.backbones.clip import CLIP_ARCHITECTURES
from coalign.datamodules import CIRRDataModule
from coalign.datamodules.base import load_image
from coalign.evaluation import Gallery, evaluate, rank
from coalign.heads.base import max_over_embeddings

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "data")]  # the offline test helpers below
from _tiny_hf import tiny_clip_tokenizer  # noqa: E402  (no network: the real tokenizer's vocabulary is not needed)
from make_fake_benchmarks import make_cirr  # noqa: E402


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def memory_child(n_gallery: int, n_queries: int, k_vectors: int, dim: int) -> None:
    """Run in a fresh process: allocate the gallery, rank, report peak memory as JSON."""

    class Scorer:  # what rank() needs of a model: the global similarity of GlobalHead
        similarity = staticmethod(max_over_embeddings)

    queries = torch.nn.functional.normalize(torch.randn(n_queries, dim), dim=-1)
    ids = [str(i) for i in range(n_gallery)]
    before = _rss_mb()
    embedding = torch.empty(n_gallery, k_vectors, dim, dtype=torch.float16)
    for start in range(0, n_gallery, 1024):  # fill in small chunks: no large fp32 temporaries
        block = torch.randn(min(1024, n_gallery - start), k_vectors, dim)
        embedding[start : start + len(block)] = torch.nn.functional.normalize(block, dim=-1)
    gallery = Gallery(ids, TargetFeatures(embedding, torch.empty(n_gallery, 0, dim, dtype=torch.float16)))
    gallery_mb = embedding.numel() * embedding.element_size() / 2**20
    start = time.perf_counter()
    index, _ = rank(Scorer(), QueryFeatures(queries, queries[:, None]), gallery, k=50)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB -> MiB on Linux
    print(json.dumps({"before_mb": before, "peak_mb": peak, "gallery_mb": gallery_mb, "seconds": seconds,
                      "shape": list(index.shape)}))  # fmt: skip


def part_b(n_gallery: int = 123_403, n_queries: int = 4_181) -> dict:
    cmd = [sys.executable, __file__, "--memory-child", str(n_gallery), str(n_queries)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    r["ratio"] = (r["peak_mb"] - r["before_mb"]) / r["gallery_mb"]
    return r


def _build_model(image_size: int, max_length: int):
    """``coalign_clip_vitb32`` with random weights, at ``image_size`` px, with an offline tiny CLIP tokenizer."""
    config = copy.deepcopy(CLIP_ARCHITECTURES["openai/clip-vit-base-patch32"])
    config["vision_config"]["image_size"] = image_size
    model = coalign.create_model("coalign_clip_vitb32", config=config, max_length=max_length)
    model.backbone.set_tokenizer(tiny_clip_tokenizer())
    return model.eval()


class _BackboneTimer:
    """Wraps the backbone's ``tokenize`` / ``encode_target`` / ``encode_query`` and adds up the time spent in them.

    Inside one ``evaluate`` run this measures the bare backbone's share side by side with the whole run, so a
    shared, noisy machine slows both alike.
    """

    def __init__(self, backbone) -> None:
        self.seconds = 0.0
        for name in ("tokenize", "encode_target", "encode_query"):
            setattr(backbone, name, self._timed(getattr(backbone, name)))

    def _timed(self, fn):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return run


@torch.no_grad()
def _bare_encode(model, data, images: dict[str, torch.Tensor], batch_size: int) -> float:
    """Encode the gallery and the queries with the backbone alone, from tensors already in memory."""
    backbone = model.backbone
    ids = data.gallery_ids
    start = time.perf_counter()
    for i in range(0, len(ids), batch_size):
        backbone.encode_target(torch.stack([images[n] for n in ids[i : i + batch_size]]))
    for i in range(0, len(data.queries), batch_size):
        part = data.queries[i : i + batch_size]
        pixels = torch.stack([images[q["reference_id"]] for q in part])
        backbone.encode_query(pixels, **backbone.tokenize([q["text"] for q in part]))
    return time.perf_counter() - start


def part_a(args) -> dict:
    torch.manual_seed(0)
    model = _build_model(args.image_size, args.max_length)
    out: dict = {"image_size": args.image_size, "max_length": args.max_length, "batch_size": args.batch_size}
    with tempfile.TemporaryDirectory() as tmp:
        root = make_cirr(Path(tmp) / "cirr", gallery=args.a_gallery, queries=args.a_queries)
        dm = CIRRDataModule(root, batch_size=args.batch_size, num_workers=0, image_transform=model.preprocess)
        data = dm.prepare_split("val")
        out.update(gallery=len(data.gallery), queries=len(data.queries))
        if args.separate_baseline:  # a second full pass: only on a quiet machine
            images = {n: model.preprocess(load_image(p)) for n, p in data.gallery}
            out["bare_separate_s"] = _bare_encode(model, data, images, args.batch_size)
            del images
        timer = _BackboneTimer(model.backbone)
        start = time.perf_counter()
        result = evaluate(model, dm, "val", Path(tmp) / "out", cache_dir=Path(tmp) / "cache", progress=False)
        out["evaluate_s"] = time.perf_counter() - start
    out["encode_s"] = timer.seconds
    out["overhead"] = out["evaluate_s"] / out["encode_s"] - 1
    out["cirr/R@1"] = result.metrics["cirr/R@1"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=224, help="(a) model input size (default 224)")
    p.add_argument("--max-length", type=int, default=77, help="(a) text tokens (default 77)")
    p.add_argument("--batch-size", type=int, default=128, help="(a) queries / images per batch")
    p.add_argument("--separate-baseline", action="store_true", help="(a) also time a separate bare-backbone pass")
    p.add_argument("--b-queries", type=int, default=4181, help="(b) number of queries (default 4181)")
    p.add_argument("--a-gallery", type=int, default=2297, help=argparse.SUPPRESS)
    p.add_argument("--a-queries", type=int, default=4181, help=argparse.SUPPRESS)
    p.add_argument("--skip-a", action="store_true")
    p.add_argument("--skip-b", action="store_true")
    p.add_argument("--b-gallery", type=int, default=123_403, help=argparse.SUPPRESS)
    p.add_argument("--memory-child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        memory_child(*args.memory_child, k_vectors=32, dim=256)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if not args.skip_a:
        a = part_a(args)
        print(f"(a) {a['gallery']} gallery images, {a['queries']} queries, {a['image_size']} px, {a['max_length']} "
              f"text tokens: coalign evaluate {a['evaluate_s']:.1f} s, of which bare backbone {a['encode_s']:.1f} s; "
              f"overhead {100 * a['overhead']:+.1f}%")  # fmt: skip
        if "bare_separate_s" in a:
            print(f"    separate bare-backbone pass from in-memory tensors: {a['bare_separate_s']:.1f} s")
        print("    " + json.dumps(a))
    if not args.skip_b:
        b = part_b(args.b_gallery, args.b_queries)
        print(f"(b) gallery {b['gallery_mb']:.0f} MiB fp16, peak above baseline {b['peak_mb'] - b['before_mb']:.0f} "
              f"MiB = {b['ratio']:.2f}x the gallery; {b['shape'][0]} queries took {b['seconds']:.0f} s")  # fmt: skip
        print("    " + json.dumps(b))


if __name__ == "__main__":
    main()
