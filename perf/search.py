"""Search speed (PERFORMANCE.md, "Search"): coalign's exact top-k against FAISS ``IndexFlatIP``, and the
approximate indexes' recall@10 and speed-up against exact search.

Three cases, each in one process with torch and FAISS set to the same thread count (``--threads``):

- ``flat``: 1,000,000 x 256 random L2-normalised float32 rows, 1,000 queries, k = 10. Sides: coalign's torch
  path (``chunked_topk(backend="torch")``), coalign's FAISS path (``chunked_topk(backend="faiss")``: ``faiss.knn``
  in place plus its exactness proof) and FAISS ``IndexFlatIP.search`` (its ``add``, a copy, is timed apart).
- ``multi``: a BLIP-2-like gallery, 100,000 images x 32 vectors x 256, scored by the max over an image's vectors.
  The FAISS reference is ``IndexFlatIP`` over all 3.2M vectors, searched for k x 32 vectors and reduced to the
  best k images (which that many vectors provably contain).
- ``ann``: clustered synthetic data (a Gaussian mixture: ``--centers`` unit centres, each row a centre plus
  noise, renormalised; queries drawn the same way), because ANN on uniform random data measures nothing useful.
  An approximate index is built with :func:`coalign._search.build_approximate` (build time reported apart),
  searched through ``Index.search_approximate`` (candidates re-scored exactly), and compared with exact search
  (coalign's default exact path) on recall@10 and time.

Sides are alternated ``--repeats`` times (the machine is shared and its speed drifts); medians are reported.
Results are compared query by query: the same ids in the same order, or a difference only where the scores are
equal to rounding (the two GEMMs may differ in the last bit).

Usage::

    python perf/search.py --case flat --repeats 2 --threads 2
    python perf/search.py --case multi --queries 200 --repeats 1 --threads 2
    python perf/search.py --case ann --approximate ivfpq --nlist 1024 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from coalign._search import APPROXIMATE, approximate_parameters, build_approximate
from coalign.evaluation.topk import chunked_topk
from coalign.index import Index


def _timed(sides: dict, repeats: int) -> tuple[dict[str, float], dict]:
    times: dict[str, list[float]] = {name: [] for name in sides}
    results = {}
    for r in range(repeats):
        for name, fn in sides.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
            print(f"  run {r + 1}: {name:<28} {times[name][-1]:7.2f} s", flush=True)
    return {name: statistics.median(v) for name, v in times.items()}, results


def _compare(name: str, got, reference) -> dict:
    (g_scores, g_ids), (r_scores, r_ids) = got, reference
    g_scores, g_ids = torch.as_tensor(g_scores), torch.as_tensor(g_ids)
    r_scores, r_ids = torch.as_tensor(r_scores), torch.as_tensor(r_ids)
    differing = (g_ids != r_ids).any(dim=1).nonzero().flatten()
    max_diff = float((g_scores - r_scores).abs().max())
    ties_only = all(float((g_scores[i] - r_scores[i]).abs().max()) < 1e-5 for i in differing)
    verdict = "" if not len(differing) else (" (near-ties only)" if ties_only else " (BEYOND ROUNDING)")
    print(f"  {name}: identical ids in order for {len(g_ids) - len(differing)} of {len(g_ids)} queries{verdict}; "
          f"max |score difference| {max_diff:.1e}")  # fmt: skip
    return {"identical_rows": len(g_ids) - len(differing), "max_score_diff": max_diff, "ties_only": ties_only}


def _table(medians: dict[str, float], queries: int, reference: str) -> None:
    print("\n| side | median s | queries/s | time / " + reference + " |\n|---|---|---|---|")
    for name, m in medians.items():
        print(f"| {name} | {m:.2f} | {queries / m:,.0f} | {m / medians[reference]:.2f}x |")


def flat(args, faiss) -> dict:
    g = torch.Generator().manual_seed(0)
    database = F.normalize(torch.randn(args.n, args.dim, generator=g), dim=-1)
    queries = F.normalize(torch.randn(args.queries, args.dim, generator=g), dim=-1)
    print(f"flat: {args.n:,} x {args.dim} fp32 ({database.numel() * 4 / 2**30:.2f} GiB), {args.queries:,} queries, "
          f"k = {args.k}")  # fmt: skip
    start = time.perf_counter()
    index = faiss.IndexFlatIP(args.dim)
    index.add(database.numpy())
    print(f"faiss add: {time.perf_counter() - start:.2f} s (not counted)")
    sides = {
        "coalign torch": lambda: chunked_topk(queries, database, args.k, backend="torch"),
        "coalign faiss (knn + proof)": lambda: chunked_topk(queries, database, args.k, backend="faiss"),
        "faiss IndexFlatIP": lambda: index.search(queries.numpy(), args.k),
    }
    medians, results = _timed(sides, args.repeats)
    _table(medians, args.queries, "faiss IndexFlatIP")
    ref = results["faiss IndexFlatIP"]
    return {"medians_s": medians, **{n: _compare(n, results[n], ref) for n in sides if n != "faiss IndexFlatIP"}}


def multi(args, faiss) -> dict:
    g = torch.Generator().manual_seed(0)
    database = F.normalize(torch.randn(args.images, args.tokens, args.dim, generator=g), dim=-1)
    queries = F.normalize(torch.randn(args.queries, args.dim, generator=g), dim=-1)
    flat_rows = database.reshape(-1, args.dim)
    print(f"multi: {args.images:,} images x {args.tokens} vectors x {args.dim} fp32 "
          f"({database.numel() * 4 / 2**30:.2f} GiB), {args.queries:,} queries, k = {args.k}")  # fmt: skip
    start = time.perf_counter()
    index = faiss.IndexFlatIP(args.dim)
    index.add(flat_rows.numpy())
    print(f"faiss add: {time.perf_counter() - start:.2f} s (not counted)")

    def faiss_reference():
        scores, ids = index.search(queries.numpy(), args.k * args.tokens)
        scores, images = torch.from_numpy(scores), torch.from_numpy(ids) // args.tokens
        out_s, out_i = torch.empty(len(queries), args.k), torch.empty(len(queries), args.k, dtype=torch.long)
        for q in range(len(queries)):  # first occurrence of an image = its best vector (results are best first)
            seen: dict[int, float] = {}
            for s, i in zip(scores[q].tolist(), images[q].tolist()):
                seen.setdefault(i, s)
            best = sorted(seen.items(), key=lambda item: (-item[1], item[0]))[: args.k]
            out_i[q], out_s[q] = torch.tensor([b[0] for b in best]), torch.tensor([b[1] for b in best])
        return out_s, out_i

    sides = {
        "coalign torch": lambda: chunked_topk(queries, database, args.k, backend="torch"),
        "coalign faiss (knn + proof)": lambda: chunked_topk(queries, database, args.k, backend="faiss"),
        "faiss IndexFlatIP + by image": faiss_reference,
    }
    medians, results = _timed(sides, args.repeats)
    _table(medians, args.queries, "faiss IndexFlatIP + by image")
    ref = results["faiss IndexFlatIP + by image"]
    return {"medians_s": medians, **{n: _compare(n, results[n], ref) for n in sides if "IndexFlatIP" not in n}}


def ann(args, faiss) -> dict:
    g = torch.Generator().manual_seed(0)
    centers = F.normalize(torch.randn(args.centers, args.dim, generator=g), dim=-1)

    def draw(count: int) -> torch.Tensor:
        which = torch.randint(args.centers, (count,), generator=g)
        noise = torch.randn(count, args.dim, generator=g) * (args.spread / args.dim**0.5)
        return F.normalize(centers[which] + noise, dim=-1)

    database = torch.cat([draw(min(100_000, args.n - s)) for s in range(0, args.n, 100_000)])
    queries = draw(args.queries)
    print(f"ann: {args.n:,} x {args.dim} clustered ({args.centers:,} centres, spread {args.spread}), "
          f"{args.queries:,} queries, k = {args.k}, {args.approximate}")  # fmt: skip
    overrides = {"nlist": args.nlist, "nprobe": args.nprobe, "M": args.M, "efSearch": args.ef_search}
    overrides = {key: v for key, v in overrides.items() if v is not None and key in APPROXIMATE[args.approximate]}
    params = approximate_parameters(args.approximate, args.n, args.dim, overrides)
    start = time.perf_counter()
    built = build_approximate(faiss, database, args.approximate, params)
    build_s = time.perf_counter() - start
    print(f"build {args.approximate} {params}: {build_s:.1f} s (not counted)", flush=True)
    embeddings = database.unsqueeze(1)
    paths = [f"{i}.jpg" for i in range(args.n)]
    info = {"approximate": {"kind": args.approximate, "params": params, "vectors": args.n, "dim": args.dim}}
    index = Index(Path("."), Path("."), paths, embeddings, info)
    index._approximate_index = built  # the perf run measures search, not the save/load round trip
    sides = {
        "exact (coalign default)": lambda: chunked_topk(queries, embeddings, args.k),
        f"approximate {args.approximate}": lambda: index.search_approximate(queries, args.k),
    }
    medians, results = _timed(sides, args.repeats)
    exact_ids, approx_ids = results["exact (coalign default)"][1], results[f"approximate {args.approximate}"][1]
    hits = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx_ids, exact_ids))
    recall = hits / exact_ids.numel()
    speedup = medians["exact (coalign default)"] / medians[f"approximate {args.approximate}"]
    _table(medians, args.queries, "exact (coalign default)")
    print(f"\nrecall@{args.k} vs exact: {recall:.4f}; speed-up over exact: {speedup:.1f}x")
    return {"medians_s": medians, "recall": recall, "speedup": speedup, "build_s": build_s, "params": params}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", choices=["flat", "multi", "ann"], default="flat")
    p.add_argument("--n", type=int, default=1_000_000, help="database rows for flat and ann (default 1,000,000)")
    p.add_argument("--images", type=int, default=100_000, help="multi: images (default 100,000)")
    p.add_argument("--tokens", type=int, default=32, help="multi: vectors per image (default 32)")
    p.add_argument("--dim", type=int, default=256, help="embedding width (default 256)")
    p.add_argument("--queries", type=int, default=1000, help="queries per search (default 1,000)")
    p.add_argument("-k", type=int, default=10, help="results per query (default 10)")
    p.add_argument("--repeats", type=int, default=2, help="alternated runs of each side (default 2)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both sides (default: all)")
    p.add_argument("--approximate", choices=["hnsw", "ivfpq"], default="ivfpq", help="ann: the index kind")
    p.add_argument("--nlist", type=int, help="ann ivfpq: cells (default: 4 sqrt(n))")
    p.add_argument("--nprobe", type=int, help="ann ivfpq: cells visited (default 32)")
    p.add_argument("--M", type=int, help="ann hnsw: links per vector (default 32)")
    p.add_argument("--ef-search", type=int, help="ann hnsw: search beam (default 128)")
    p.add_argument("--centers", type=int, default=4096, help="ann: mixture centres (default 4,096)")
    p.add_argument("--spread", type=float, default=1.0, help="ann: noise norm relative to a centre (default 1.0)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args()

    import faiss  # an optional, heavy dependency: after parsing, so that --help works without it

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    print(f"{args.threads} threads (torch and faiss), torch {torch.__version__}, faiss {faiss.__version__}, "
          f"{platform.processor() or platform.machine()}, load average {os.getloadavg()}")  # fmt: skip
    payload = {"args": vars(args), "load_before": os.getloadavg()}
    payload.update({"flat": flat, "multi": multi, "ann": ann}[args.case](args, faiss))
    payload["load_after"] = os.getloadavg()
    print(f"load average after: {payload['load_after']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)


if __name__ == "__main__":
    main()
