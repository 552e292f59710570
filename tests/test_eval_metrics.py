"""Golden tests of the benchmark evaluators (hand-computed values) and of the ranking engine and cache."""

from __future__ import annotations

import pytest
import torch
from _eval_fakes import FakeCIRModel

from coalign import TargetFeatures
from coalign.datamodules import CIRCOEvaluator, CIRREvaluator, FashionIQEvaluator
from coalign.evaluation import Gallery, TargetRecall, encode_gallery, evaluation_step, rank
from coalign.evaluation.cache import cached_gallery

G60 = [f"g{i}" for i in range(60)]


def _batch(**keys):
    n = len(keys["reference_id"])
    return {"index": torch.arange(n), "target_id": [""] * n, **keys}


# -- FashionIQ ----------------------------------------------------------------------------------------------
def test_fashioniq_recall_per_category_within_its_own_gallery():
    dress, shirt = [f"d{i}" for i in range(60)], [f"s{i}" for i in range(60)]
    ev = FashionIQEvaluator(dress + shirt, {"dress": dress, "shirt": shirt})
    assert ev.top_k == 120  # a category inside a union gallery needs the full ranking
    interleaved = [x for pair in zip(shirt, dress) for x in pair]  # s0 d0 s1 d1 ...: half the list is foreign

    def moved(target, pos):  # put target at in-category position pos
        own = [x for x in interleaved if x[0] == target[0] and x != target]
        own.insert(pos, target)
        other = [x for x in interleaved if x[0] != target[0]]
        return [x for pair in zip(other, own) for x in pair]

    batch = _batch(
        reference_id=["d50", "d51", "s50", "s51"],
        target_id=["d3", "d7", "s9", "s2"],
        category=["dress", "dress", "shirt", "shirt"],
    )
    ranked = [moved("d3", 4), moved("d7", 20), moved("s9", 55), moved("s2", 0)]
    ev.update(batch, ranked)
    got = ev.compute()
    assert got == pytest.approx(
        {
            "fashioniq/dress/R@10": 50.0,
            "fashioniq/dress/R@50": 100.0,
            "fashioniq/shirt/R@10": 50.0,
            "fashioniq/shirt/R@50": 50.0,
            "fashioniq/avg/R@10": 50.0,
            "fashioniq/avg/R@50": 75.0,
            "fashioniq/avg": 62.5,
        }
    )
    rankings = ev.rankings()
    assert all(len(r) == 50 for r in rankings.values())
    assert all(name.startswith("d") for name in rankings[0]) and rankings[0][4] == "d3"


def test_fashioniq_exclude_reference_option_and_single_category_top_k():
    names = [f"d{i}" for i in range(60)]
    ev = FashionIQEvaluator(names, {"dress": names}, exclude_reference=True)
    assert ev.top_k == 50
    ev.update(_batch(reference_id=["d0"], target_id=["d1"], category=["dress"]), [names])
    assert ev.compute()["fashioniq/dress/R@10"] == 100.0
    assert "d0" not in ev.rankings()[0]


# -- CIRR ---------------------------------------------------------------------------------------------------
def _cirr_case(labels: str) -> CIRREvaluator:
    ev = CIRREvaluator(G60, labels=labels)
    assert ev.exclude_reference and ev.top_k == 60
    q1 = ["g0", "g7", "g3", "g1", "g2", "g4", "g5"] + [
        g for g in G60 if g not in {"g0", "g7", "g3", "g1", "g2", "g4", "g5"}
    ]
    front = ["g20", "g21", "g59", "g22", "g23"]
    q2 = ["g20", "g21"] + [g for g in G60 if g not in set(front) | {"g10"}] + ["g59", "g22", "g23", "g10"]
    batch = _batch(
        reference_id=["g0", "g10"],
        target_id=["g3", "g59"],
        subset_members=[["g0", "g1", "g2", "g3", "g4", "g5"], ["g10", "g20", "g21", "g22", "g23", "g59"]],
        target_soft=[{"g3": 1.0, "g7": 0.5, "g1": -1.0}, {"g59": 1.0, "g20": 0.5}],
    )
    ev.update(batch, [q1, q2])
    return ev


def test_cirr_hard_labels_golden():
    ev = _cirr_case("hard")
    # q1: after removing g0, g3 ranks 2nd and first in its subset; q2: g59 ranks 58th, 3rd in its subset
    assert ev.compute() == pytest.approx(
        {
            "cirr/R@1": 0.0,
            "cirr/R@5": 50.0,
            "cirr/R@10": 50.0,
            "cirr/R@50": 50.0,
            "cirr/Rs@1": 50.0,
            "cirr/Rs@2": 50.0,
            "cirr/Rs@3": 100.0,
            "cirr/Avg": 50.0,
        }
    )
    assert ev.rankings()[0][:3] == ["g7", "g3", "g1"] and "g0" not in ev.rankings()[0]
    assert ev.subset_rankings() == {0: ["g3", "g1", "g2"], 1: ["g20", "g21", "g59"]}


def test_cirr_soft_labels_golden():
    got = _cirr_case("soft").compute()
    # q1 top1 g7 (0.5), top5 has g3 (1.0), subset top1 g3 (1.0); q2 top1 g20 (0.5), subset top1 g20 (0.5)
    assert got["cirr/R@1"] == pytest.approx(50.0)
    assert got["cirr/R@5"] == pytest.approx(75.0)
    assert got["cirr/R@50"] == pytest.approx(75.0)
    assert got["cirr/Rs@1"] == pytest.approx(75.0)
    assert got["cirr/Rs@3"] == pytest.approx(100.0)


def test_cirr_test_split_keeps_rankings_without_metrics():
    ev = CIRREvaluator(G60, has_labels=False)
    ev.update(_batch(reference_id=["g0"], subset_members=[["g0", "g1", "g2", "g3", "g4", "g5"]]), [G60])
    assert ev.compute() == {}
    assert ev.subset_rankings() == {0: ["g1", "g2", "g3"]}


# -- CIRCO --------------------------------------------------------------------------------------------------
def test_circo_map_golden():
    ids = [str(i) for i in range(1, 61)]
    ev = CIRCOEvaluator(ids, ["addition", "negation"])
    a = ["2", "7", "5", "8", "9"] + [i for i in ids if i not in {"2", "7", "5", "8", "9"}]
    b = [i for i in ids if i != "40"]
    b.insert(11, "40")  # 12th place
    batch = _batch(
        reference_id=["60", "59"],
        target_id=["2", "40"],
        gt_ids=[["2", "5", "9"], ["40"]],
        semantic_aspects=[["addition"], ["addition", "negation"]],
    )
    ev.update(batch, [a, b])
    ap_a = (1 + 2 / 3 + 3 / 5) / 3  # hits at 1, 3, 5; min(|gt|, k) = 3
    ap_b25 = 1 / 12
    got = ev.compute()
    assert got["circo/mAP@5"] == pytest.approx(100 * ap_a / 2)
    assert got["circo/mAP@10"] == pytest.approx(100 * ap_a / 2)
    assert got["circo/mAP@25"] == pytest.approx(100 * (ap_a + ap_b25) / 2)
    assert got["circo/mAP@50"] == pytest.approx(100 * (ap_a + ap_b25) / 2)
    assert [got[f"circo/R@{k}"] for k in (5, 10, 25, 50)] == pytest.approx([50, 50, 100, 100])
    assert got["circo/aspect/addition/mAP@10"] == pytest.approx(100 * ap_a / 2)
    assert got["circo/aspect/negation/mAP@10"] == 0.0


def test_duplicate_queries_from_ddp_padding_count_once():
    ev = CIRREvaluator(G60)
    for _ in range(2):  # DistributedSampler repeats samples to even out ranks
        ev.update(_batch(reference_id=["g0"], target_id=["g1"], subset_members=[["g0"] + G60[1:6]]), [G60])
    ev.update(
        {**_batch(reference_id=["g0"], target_id=["g9"], subset_members=[["g0"] + G60[1:6]]), "index": [1]}, [G60]
    )
    assert ev.compute()["cirr/R@1"] == 50.0


def test_unknown_names_and_text_keys_are_errors():
    ev = CIRREvaluator(G60)
    with pytest.raises(ValueError, match="outside the gallery"):
        ev.update(_batch(reference_id=["g0"], target_id=["g1"], subset_members=[G60[:6]]), [["nope"]])
    fiq = FashionIQEvaluator(G60, {"dress": G60}, query_text_keys=("text", "text_reversed"))
    with pytest.raises(ValueError, match="evaluation_step"):
        fiq.update(_batch(reference_id=["g0"], category=["dress"]), [G60])


# -- engine and cache ---------------------------------------------------------------------------------------
def _gallery(n=300, k=2, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(n, k, dim, generator=g), dim=-1)
    return Gallery([f"x{i}" for i in range(n)], TargetFeatures(emb, emb[:, :1]))


def test_rank_chunks_match_brute_force_and_exclude():
    model, gallery = FakeCIRModel(), _gallery()
    q = torch.nn.functional.normalize(torch.randn(70, 16), dim=-1)
    from coalign import QueryFeatures

    queries = QueryFeatures(q, q[:, None])
    full = model.similarity(q, gallery.features.embedding)
    idx, scores = rank(model, queries, gallery, k=20, chunk_size=37, query_chunk_size=16)
    assert torch.equal(idx, full.topk(20, dim=1).indices)
    excl = [gallery.ids[int(i)] for i in idx[:, 0]]
    idx2, _ = rank(model, queries, gallery, k=20, exclude_ids=excl, chunk_size=50)
    assert torch.equal(idx2[:, :19], idx[:, 1:20])


def test_encode_gallery_and_disk_cache(tmp_path):
    model = FakeCIRModel()
    images = torch.randn(10, 3, 8, 8)
    loader = torch.utils.data.DataLoader(
        [{"image": im, "image_id": f"i{j}"} for j, im in enumerate(images)], batch_size=4
    )
    plain = encode_gallery(model, loader, progress=False)
    assert plain.ids == [f"i{j}" for j in range(10)]
    entries = [(f"i{j}", tmp_path / f"i{j}.png") for j in range(10)]
    first, path, hit = cached_gallery(model, loader, tmp_path / "c", entries, name="t", progress=False)
    assert not hit and path.suffix == ".safetensors" and path.read_bytes()[:8] != b"\x80\x04\x95"  # not a pickle
    calls = model.target_calls
    second, path2, hit2 = cached_gallery(model, loader, tmp_path / "c", entries, name="t", progress=False)
    assert hit2 and path2 == path and model.target_calls == calls
    assert torch.equal(second.features.embedding, plain.features.embedding) and second.ids == plain.ids
    half, path3, hit3 = cached_gallery(model, loader, tmp_path / "c", entries, "t", dtype=torch.float16, progress=False)
    assert not hit3 and path3 != path and half.features.embedding.dtype == torch.float16
    with torch.no_grad():
        model.proj.add_(1.0)  # new weights: a new key, never the stale file
    _, path4, hit4 = cached_gallery(model, loader, tmp_path / "c", entries, name="t", progress=False)
    assert not hit4 and path4 != path


def test_rerank_reorders_only_the_head():
    class Reranking(FakeCIRModel):
        local_head = object()
        rerank_top_k = 5

        def rerank(self, queries, targets, index, scores):  # reverse the head: visible and easy to check
            return index.flip(1), scores.flip(1)

    from coalign import QueryFeatures

    model, gallery = Reranking(), _gallery(n=40)
    q = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    plain, _ = rank(FakeCIRModel(), QueryFeatures(q, q[:, None]), gallery, k=20)
    reranked, _ = rank(model, QueryFeatures(q, q[:, None]), gallery, k=20)
    assert torch.equal(reranked[:, :5], plain[:, :5].flip(1)) and torch.equal(reranked[:, 5:], plain[:, 5:])


def test_evaluation_step_drives_target_recall_like_any_evaluator():
    model, gallery = FakeCIRModel(), _gallery(n=30, k=2)
    batch = {"reference": torch.randn(2, 3, 8, 8), "text": ["a", "b"], "reference_id": ["x0", "x1"]}
    batch |= {"target_id": ["x2", "x3"], "index": torch.arange(2)}
    recall = TargetRecall(gallery.ids, ks=(1, 30), exclude_reference=True)
    recall.check_gallery(gallery.ids)
    index, _ = evaluation_step(model, batch, gallery, recall)
    assert recall.compute()["R@30"] == 100.0
    assert all(len(r) == 29 and ref not in r for r, ref in zip(recall.rankings().values(), ["x0", "x1"]))
    ev = CIRCOEvaluator([f"y{i}" for i in range(30)], has_labels=False)
    with pytest.raises(ValueError, match="not encoded from this evaluator's split"):
        ev.check_gallery(gallery.ids)
    with pytest.raises(ValueError, match="not encoded from this evaluator's split"):
        recall.check_gallery(gallery.ids[::-1])


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric TargetRecall was called before")
def test_target_recall_golden_names_or_positions():
    names = [f"t{i}" for i in range(12)]
    batch = {"reference_id": ["t0", "t1", "t2"], "target_id": ["t3", "t9", "nope"], "index": torch.arange(3)}
    ranked = [names[2:] + names[:2]] * 2 + [names[::-1]]  # t3 2nd, t9 8th, a target outside the gallery
    by_names = TargetRecall(names, ks=(1, 2, 8), prefix="shapes/")
    by_names.update(batch, ranked)
    by_positions = TargetRecall(names, ks=(1, 2, 8), prefix="shapes/")
    by_positions.update(batch, torch.tensor([[names.index(n) for n in row] for row in ranked]))
    expected = {"shapes/R@1": 0.0, "shapes/R@2": 100 / 3, "shapes/R@8": 200 / 3}
    assert by_names.compute() == pytest.approx(expected) and by_positions.compute() == by_names.compute()
    assert by_names.rankings()[0] == names[2:10] and by_names.top_k == 8
    with pytest.raises(ValueError, match="before any update"):
        TargetRecall(names).compute()
