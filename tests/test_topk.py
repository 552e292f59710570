"""The one exact top-k (coalign.evaluation.topk): golden values, tie order, both backends, the FAISS exactness
proof and its fallback, multi-vector rows, exclusion, candidate re-scoring, bad input."""

import pytest
import torch
import torch.nn.functional as F

import coalign.evaluation.topk as topk_module
from coalign import create_model
from coalign.evaluation.topk import (
    GROUP,
    _order_keys,
    _unpack,
    candidate_topk,
    chunked_topk,
    faiss_available,
    scoring_function,
)
from coalign.heads.base import max_over_embeddings

BACKENDS = ["torch", pytest.param("faiss", marks=pytest.mark.skipif(not faiss_available(), reason="no faiss"))]


def _reference(queries, database, k, exclude=None):
    """Brute force in the documented order: score desc, then lower row (a stable sort of all rows)."""
    scores = max_over_embeddings(queries, database)
    if exclude is not None:
        hit = (exclude >= 0).nonzero().flatten()
        scores[hit, exclude[hit]] = float("-inf")
    values, order = scores.sort(dim=1, descending=True, stable=True)
    return values[:, :k], order[:, :k]


@pytest.mark.parametrize("backend", BACKENDS)
def test_golden_values_and_ties_go_to_the_lower_row(backend):
    database = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [2.0, 0.0], [0.5, 0.5], [1.0, 0.0]])
    queries = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    top = chunked_topk(queries, database, 3, backend=backend)
    # query 0 scores 1, 0, 1, 2, .5, 1: row 3, then the tie of rows 0, 2 and 5 broken by row (5 is cut)
    assert top.indices.tolist() == [[3, 0, 2], [1, 4, 0]]
    assert top.values.tolist() == [[2.0, 1.0, 1.0], [2.0, 1.0, 0.0]]
    assert top.values.dtype == torch.float32 and top.indices.dtype == torch.long


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vectors", [1, 3])
def test_exact_ties_everywhere_give_the_same_ids_on_both_paths(backend, vectors):
    # small integers: every score is exact in float32, so ties are real and the paths cannot round differently
    g = torch.Generator().manual_seed(0)
    database = torch.randint(-2, 3, (3000, vectors, 8), generator=g).float().squeeze(1)
    queries = torch.randint(-2, 3, (25, 8), generator=g).float()
    exclude = torch.randint(-1, 3000, (25,), generator=g)
    for chunk_rows in (None, 700, 64 * GROUP + 5):
        top = chunked_topk(queries, database, 7, exclude=exclude, chunk_rows=chunk_rows, backend=backend)
        values, rows = _reference(queries, database, 7, exclude)
        assert torch.equal(top.indices, rows), chunk_rows
        assert torch.equal(top.values, values)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vectors", [1, 4])
def test_random_rows_in_any_block_size_equal_one_big_sort(backend, vectors):
    torch.manual_seed(1)
    database = F.normalize(torch.randn(5000, vectors, 16), dim=-1).squeeze(1)
    queries = F.normalize(torch.randn(30, 16), dim=-1)
    values, rows = _reference(queries, database, 10)
    for chunk_rows in (None, 1000, 777, 10 * GROUP):
        top = chunked_topk(queries, database, 10, chunk_rows=chunk_rows, backend=backend)
        assert torch.equal(top.indices, rows)
        torch.testing.assert_close(top.values, values)
    # a custom similarity (here the same function, as a lambda: not recognised, so scored block by block)
    top = chunked_topk(queries, database, 10, similarity=lambda q, r: max_over_embeddings(q, r), chunk_rows=900)
    assert torch.equal(top.indices, rows)


def test_half_precision_storage_and_queries():
    torch.manual_seed(2)
    database = F.normalize(torch.randn(2000, 2, 16), dim=-1).half()
    queries = F.normalize(torch.randn(5, 16), dim=-1)
    values, rows = _reference(queries, database.float(), 5)
    for backend in ("torch", "faiss") if faiss_available() else ("torch",):
        top = chunked_topk(queries, database, 5, chunk_rows=300, backend=backend)
        assert torch.equal(top.indices, rows)
        torch.testing.assert_close(top.values, values)


@pytest.mark.skipif(not faiss_available(), reason="no faiss")
def test_faiss_lists_that_fail_the_proof_are_ranked_again_exactly(monkeypatch):
    # 40 copies of one row: FAISS's best 2 * 1 + 1 vectors are all copies, so the 2nd image ties the last vector
    # FAISS returned; only the torch re-ranking can say the copies with the lowest rows win
    database = torch.cat([torch.zeros(10, 4), torch.ones(40, 4), torch.zeros(10, 4)])
    database[:10, 0] = torch.arange(10) / 100
    queries = torch.ones(2, 4)
    redone = []
    real = topk_module._torch_topk
    monkeypatch.setattr(topk_module, "_torch_topk", lambda *a, **kw: redone.append(len(a[0])) or real(*a, **kw))
    top = chunked_topk(queries, database, 2, backend="faiss")
    assert top.indices.tolist() == [[10, 11], [10, 11]] and redone == [2]
    # a clear winner passes the proof: no re-ranking
    redone.clear()
    clear = chunked_topk(torch.tensor([[1.0, 0.0, 0.0, 0.0]]), database, 2, backend="faiss")
    assert clear.indices.tolist() == [[10, 11]] and redone == [1]  # rows 10.. tie at 1.0: proof fails again
    redone.clear()
    distinct = F.normalize(torch.randn(500, 4, generator=torch.Generator().manual_seed(3)), dim=-1)
    chunked_topk(distinct[:3], distinct, 5, backend="faiss")
    assert redone == []


def test_exclusion_fewer_rows_than_k_and_empty_queries():
    database = torch.eye(3)
    queries = torch.eye(3)
    top = chunked_topk(queries, database, 10, exclude=torch.tensor([0, -1, 2]), backend="torch")
    assert top.indices.shape == (3, 2)  # k capped at N - 1 when something is excluded
    assert top.indices[0].tolist() == [1, 2] and top.indices[2].tolist() == [0, 1]
    assert top.indices[1].tolist() == [1, 0]
    empty = chunked_topk(torch.empty(0, 3), database, 2)
    assert empty.indices.shape == (0, 0)


def test_order_keys_round_trip_and_order():
    values = torch.tensor([[-float("inf"), -2.5, -0.0, 0.0, 1e-30, 3.0, float("inf")]])
    rows = torch.tensor([[5, 4, 3, 2, 1, 0, 7]])
    keys = _order_keys(values, rows)
    back = _unpack(keys)
    assert torch.equal(back.indices, rows) and torch.equal(back.values, values + 0.0)
    order = keys.argsort(dim=1, descending=True)[0].tolist()
    assert order == [6, 5, 4, 3, 2, 1, 0]  # 0.0 (row 2, position 3) and -0.0 (row 3) tie: the lower row first


def test_candidate_topk_ranks_only_the_candidates_exactly():
    torch.manual_seed(4)
    database = F.normalize(torch.randn(100, 3, 8), dim=-1)
    queries = F.normalize(torch.randn(4, 8), dim=-1)
    candidates = torch.tensor([[5, 7, 7, -1, 9, 11], [1, 2, 3, 4, 5, 6], [50, 40, 30, 20, 10, 0], [9, 8, 7, 6, 5, 4]])
    exclude = torch.tensor([-1, 3, -1, 9])
    top = candidate_topk(queries, database, candidates, 3, exclude=exclude)
    for q in range(4):
        allowed = sorted({int(c) for c in candidates[q] if c >= 0 and c != exclude[q]})
        scores = max_over_embeddings(queries[q : q + 1], database[allowed])[0]
        best = scores.sort(descending=True, stable=True).indices[:3]
        assert top.indices[q].tolist() == [allowed[i] for i in best]
        torch.testing.assert_close(top.values[q], scores[best])


def test_scoring_function_uses_the_fast_path_only_for_inner_product_heads():
    model = create_model("coalign_tiny", channels=8, embed_dim=32, text_layers=1)
    assert scoring_function(model) is None

    class Scaled(type(model.global_head)):
        def similarity(self, query, target):
            return 2 * super().similarity(query, target)

    model.global_head.__class__ = Scaled
    assert scoring_function(model) == model.similarity


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="backend must be"):
        chunked_topk(torch.ones(1, 2), torch.ones(3, 2), 1, backend="gpu")
    with pytest.raises(ValueError, match=r"queries \[Q, E\].*\(1, 3\) and \(3, 2\)"):
        chunked_topk(torch.ones(1, 3), torch.ones(3, 2), 1)
    with pytest.raises(ValueError, match="k must be >= 1"):
        chunked_topk(torch.ones(1, 2), torch.ones(3, 2), 0)
    with pytest.raises(ValueError, match="backend 'faiss' needs"):
        chunked_topk(torch.ones(1, 2), torch.ones(3, 2), 1, similarity=lambda q, r: q @ r.T, backend="faiss")
