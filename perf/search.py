"""Exact search: coalign's torch path (``coalign.evaluation.topk.chunked_topk``, behind ``Index.search`` and
evaluation) against FAISS ``IndexFlatIP`` (PERFORMANCE.md, "Search").

Both search the same random L2-normalised float32 database for the same queries, exactly (inner product, top k).
The two are alternated ``--repeats`` times in one process, because this machine is shared and its speed drifts;
medians are reported. FAISS's ``add`` (a copy of the database) is timed apart and not counted. The results are
compared query by query: the same ids in the same order, and the same scores up to float rounding (the two use
different GEMM blockings, so the last bits of a score may differ and turn an exact tie the other way).

Usage::

    python perf/search.py                       # 1,000,000 x 256, 1,000 queries, k = 10, every core
    python perf/search.py --n 100000 --repeats 1 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from coalign.evaluation.topk import chunked_topk


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="database vectors (default 1,000,000)")
    p.add_argument("--dim", type=int, default=256, help="embedding width (default 256)")
    p.add_argument("--queries", type=int, default=1000, help="queries per search (default 1,000)")
    p.add_argument("-k", type=int, default=10, help="results per query (default 10)")
    p.add_argument("--repeats", type=int, default=3, help="alternated runs of each side (default 3)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both sides (default: all)")
    p.add_argument("--chunk-rows", type=int, help="rows per chunk of the torch path (default: its own choice)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args()

    import faiss  # an optional, heavy dependency: after parsing, so that --help works without it

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    database = F.normalize(torch.randn(args.n, args.dim, generator=g), dim=-1)
    queries = F.normalize(torch.randn(args.queries, args.dim, generator=g), dim=-1)
    print(f"database {args.n:,} x {args.dim} fp32 ({database.numel() * 4 / 2**30:.2f} GiB), {args.queries:,} "
          f"queries, k = {args.k}, {args.threads} threads, {platform.processor() or platform.machine()}")  # fmt: skip

    start = time.perf_counter()
    index = faiss.IndexFlatIP(args.dim)
    index.add(database.numpy())
    add_s = time.perf_counter() - start
    print(f"faiss add: {add_s:.2f} s (not counted)")

    def run_torch():
        scores, ids = chunked_topk(queries, database, args.k, chunk_rows=args.chunk_rows)
        return scores.numpy(), ids.numpy()

    def run_faiss():
        return index.search(queries.numpy(), args.k)

    times: dict[str, list[float]] = {"coalign (torch)": [], "faiss IndexFlatIP": []}
    results = {}
    for r in range(args.repeats):
        for name, fn in (("coalign (torch)", run_torch), ("faiss IndexFlatIP", run_faiss)):
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
            print(f"  run {r + 1}: {name:<18} {times[name][-1]:7.2f} s")

    (t_scores, t_ids), (f_scores, f_ids) = results["coalign (torch)"], results["faiss IndexFlatIP"]
    differing = (t_ids != f_ids).any(axis=1).nonzero()[0]
    max_diff = float(abs(t_scores - f_scores).max())
    # a row whose ids differ is acceptable only as a near-tie: its scores agree to rounding
    ties_only = all(abs(t_scores[i] - f_scores[i]).max() < 1e-5 for i in differing)

    medians = {name: statistics.median(v) for name, v in times.items()}
    ratio = medians["coalign (torch)"] / medians["faiss IndexFlatIP"]
    print("\n| side | median s | queries/s |\n|---|---|---|")
    for name, m in medians.items():
        print(f"| {name} | {m:.2f} | {args.queries / m:,.0f} |")
    print(f"\ncoalign / faiss time: {ratio:.2f}x (budget 1.20x)")
    print(f"identical ids, in order: {args.queries - len(differing)} of {args.queries} queries; "
          f"max |score difference| {max_diff:.2e}")  # fmt: skip
    if len(differing):
        print(f"the {len(differing)} other queries differ {'only by near-ties' if ties_only else 'BEYOND ROUNDING'}")
    if args.json:
        payload = {"args": vars(args), "medians_s": medians, "ratio": ratio, "max_score_diff": max_diff,
                   "identical_rows": args.queries - len(differing), "faiss_add_s": add_s}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)


if __name__ == "__main__":
    main()
